"""Generate with an (IA)³ adapter, export for generation (pt2 and ONNX, unmerged), swap adapters.

    python examples/generate_and_export.py [--out DIR]

A tiny Llama built from a config (random weights, no download) is adapted with PEFT's Llama
targets, and its vectors are set far from ones (a stand-in for training). Then:

1. ``IA3Model.generate`` (greedy; a single prompt and a left-padded batch of two); the base model's
   tokens must differ, so the adapter visibly matters;
2. ``ia3fx.export(..., for_generation=True, merged=False)`` to pt2 (transformers' static-cache
   ExecuTorch form) and to ONNX (past key values, Optimum's names);
3. ``ia3fx.decode.greedy_pt2`` on the loaded pt2 program and ``ia3fx.decode.greedy_onnx`` in
   onnxruntime: their tokens must equal ``generate``'s (ONNX on the padded batch too);
4. a second adapter (other vectors, same targets) saved in PEFT's format and swapped into both
   files with ``ia3fx.swap_adapter``: the new files' tokens must equal ``generate``'s with that
   adapter loaded, and differ from the first adapter's.

Exits non-zero on any mismatch. Needs ``onnx``, ``onnxscript`` and ``onnxruntime``; about 30 s on
two CPU cores (the ONNX export is most of it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

import ia3fx
from ia3fx.decode import greedy_onnx, greedy_pt2

NEW = 16  # new tokens per sequence

warnings.filterwarnings("ignore")  # exporter notices


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,  # no eos: every sequence gets NEW tokens
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def randomize(ia3: ia3fx.IA3Model, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for vector in ia3.ia3_l[adapter].parameters():
            vector.copy_(torch.exp(torch.randn(vector.shape, generator=g)))  # about 0.1 to 10


def check(what: str, got: torch.Tensor, want: torch.Tensor) -> bool:
    same = got.shape == want.shape and torch.equal(got, want)
    print(f"  {what}: {'same tokens' if same else 'MISMATCH'}")
    if not same:
        print(f"    got  {got.tolist()}\n    want {want.tolist()}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the exported files and adapters (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ia3fx-generate-")
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, name)  # noqa: E731

    ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config())
    randomize(ia3, "default", seed=1)
    prompt = torch.tensor([[5, 17, 42, 99, 3, 64, 21, 8]])
    batch = torch.tensor([[0, 0, 0, 11, 12, 13, 14, 15], [5, 17, 42, 99, 3, 64, 21, 8]])
    mask = (batch != 0).long()
    kw = dict(max_new_tokens=NEW, do_sample=False)
    ok = True

    t0 = time.perf_counter()
    want = ia3.generate(input_ids=prompt, **kw)
    want_batch = ia3.generate(input_ids=batch, attention_mask=mask, **kw)
    with ia3.disable_adapter():
        base = ia3.generate(input_ids=prompt, **kw)
    print(f"generate ({len(ia3.targets)} adapted layers): {want[0, prompt.shape[1]:].tolist()}"
          f" in {time.perf_counter() - t0:.1f} s")
    print(f"  base model without the adapter: {base[0, prompt.shape[1]:].tolist()}")
    if torch.equal(base, want):
        print("  MISMATCH: the adapter does not change the tokens")
        ok = False

    t0 = time.perf_counter()
    pt2 = ia3fx.export(ia3, path("model.pt2"), format="pt2", for_generation=True, merged=False,
                       max_cache_len=64, overwrite=True)
    print(f"exported {os.path.basename(pt2)} (static cache of 64 positions) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    onnx = ia3fx.export(ia3, path("model.onnx"), format="onnx", for_generation=True, merged=False, overwrite=True)
    print(f"exported {os.path.basename(onnx)} (past key values) in {time.perf_counter() - t0:.1f} s")

    ok &= check("pt2 greedy_pt2 vs generate", greedy_pt2(torch.export.load(pt2), prompt, NEW), want)
    ok &= check("onnx greedy_onnx vs generate", greedy_onnx(onnx, prompt, NEW), want)
    ok &= check("onnx greedy_onnx, left-padded batch vs generate",
                greedy_onnx(onnx, batch, NEW, attention_mask=mask), want_batch)

    # a second adapter for the same targets, as a PEFT-format directory
    ia3.save_pretrained(path("adapter-a"))
    ia3.add_adapter("b", ia3fx.IA3Config())
    randomize(ia3, "b", seed=2)
    ia3.set_adapter("b")
    ia3.save_pretrained(path("adapter-b"), selected_adapters=["b"])
    want_b = ia3.generate(input_ids=prompt, **kw)
    if torch.equal(want_b, want):
        print("  MISMATCH: the second adapter generates the first one's tokens")
        ok = False

    t0 = time.perf_counter()
    adapter_b = os.path.join(path("adapter-b"), "b")  # save_pretrained puts a non-default adapter in <dir>/<name>
    pt2_b = ia3fx.swap_adapter(pt2, adapter_b, path("model-b.pt2"), overwrite=True)
    onnx_b = ia3fx.swap_adapter(onnx, adapter_b, path("model-b.onnx"), overwrite=True)
    print(f"swapped the second adapter into both files in {time.perf_counter() - t0:.2f} s")
    ok &= check("pt2 after swap_adapter vs generate with adapter b", greedy_pt2(torch.export.load(pt2_b), prompt, NEW), want_b)
    ok &= check("onnx after swap_adapter vs generate with adapter b", greedy_onnx(onnx_b, prompt, NEW), want_b)
    ok &= check("the original pt2, unchanged", greedy_pt2(torch.export.load(pt2), prompt, NEW), want)

    if not ok:
        print("FAILED: see the mismatches above")
        return 1
    print(f"OK: generate, pt2 and ONNX decodes agree ({NEW} new tokens), before and after swapping adapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
