"""Adapt a torchao-quantized model: train the vectors, merge them into the quantized weights, export.

A tiny Llama (built-in preset, random weights) is quantized to int4 weights (torchao's CPU int4
path, ``IntxWeightOnlyConfig``), adapted with PEFT's default targets for Llama (``k_proj``,
``v_proj`` scale their output, ``down_proj`` its input), trained for a few steps, then merged:
the output vectors fold into the int4 weights' scales (the int4 data stays as it was), the input
vectors, which per-row scales cannot hold, stay a multiply in front of their layer. The merged
graph is exported to a ``.pt2`` file and reloaded.

    python examples/quantized_base.py
"""

from __future__ import annotations

import os
import tempfile
import warnings

import torch
from torchao.quantization import IntxWeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup

import ia3fx
from ia3fx.presets import build_preset

torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model: threads only add synchronisation

model = build_preset("tiny-llama").eval()
model.config.use_cache = False
quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
print("k_proj weight:", type(model.model.layers[0].self_attn.k_proj.weight).__name__)

ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())
ia3.print_trainable_parameters()

ids = torch.randint(0, model.config.vocab_size, (4, 16))
optimizer = torch.optim.AdamW([p for p in ia3.parameters() if p.requires_grad], lr=0.05)
ia3.train()
losses = []
for _ in range(8):
    loss = ia3(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
assert losses[-1] < losses[0], "training did not reduce the loss"
ia3.eval()

test_ids = torch.randint(0, model.config.vocab_size, (2, 12))
with torch.no_grad():
    adapted = ia3(input_ids=test_ids).logits

with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "merged.pt2")
    ia3fx.export(ia3, path, format="pt2")  # the merged graph: folded scales, kept multiplies
    exported = torch.export.load(path).module()
    with torch.no_grad():
        pt2 = exported(input_ids=test_ids)
    pt2 = pt2.logits if hasattr(pt2, "logits") else pt2
print(f"pt2 round trip: max |logits diff| = {(pt2 - adapted).abs().max():.2e}")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the note that some vectors stay a multiply: printed below
    merged = ia3.merge_and_unload()
print(ia3.merge_report)
with torch.no_grad():
    diff = (merged(input_ids=test_ids).logits - adapted).abs().max().item()
print(f"merge_and_unload: max |logits diff| = {diff:.2e}")
assert diff < 1e-4 and (pt2 - adapted).abs().max() < 1e-4
print("OK: quantized base adapted, trained, merged and exported")
