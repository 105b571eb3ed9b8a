"""Serve mixed requests from one exported ONNX model: each request with its own (IA)³ adapter.

    python examples/serve_mixed_onnx.py [--out DIR]

A tiny Llama built from a config (random weights, no download) gets three adapters for three
"tenants" (different target layers; vectors set far from ones, a stand-in for training). Then:

1. one training step on a batch that mixes the tenants (``adapter_names=``): each adapter's
   vectors get a gradient from its own rows only;
2. ``ia3fx.export(..., format="onnx", for_generation=True, adapters=[...])``: one ONNX decoder with
   past key values whose ``adapter_index`` input picks each row's adapter (0: the base model);
3. a queue of requests, each naming a tenant (or none), served in batches of 4 by
   ``ia3fx.decode.greedy_onnx`` in onnxruntime: every answer must equal
   ``IA3Model.generate(..., adapter_names=...)``, and the tenants' answers must differ;
4. a fourth tenant added to the deployed file with ``ia3fx.swap_adapter`` (a new table row),
   without exporting again, and served the same way.

Exits non-zero on any mismatch. Needs ``onnx``, ``onnxscript`` and ``onnxruntime``; about 40 s on
two CPU cores (the ONNX export is most of it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections import deque

import torch

import ia3fx
from ia3fx.decode import greedy_onnx

NEW = 8  # new tokens per request
warnings.filterwarnings("ignore")  # exporter notices

TENANTS = {  # name: the layers its adapter scales (feedforward ones get their input scaled)
    "support": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "sql": {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": ["up_proj"]},
    "legal": {"target_modules": ["v_proj", "up_proj"], "feedforward_modules": ["up_proj"]},  # added later: only
}  # sites the exported table has (an adapter of other layers is refused by swap_adapter)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,  # no eos: every request gets NEW tokens
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def randomize(ia3, adapter: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ia3.ia3_l[adapter].parameters():
            p.copy_(torch.empty(p.shape).uniform_(0.2, 1.8, generator=g))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for the files (default: a temporary one)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="ia3fx-mixed-")
    os.makedirs(out, exist_ok=True)
    ok = True

    names = list(TENANTS)
    ia3 = ia3fx.get_ia3_model(tiny_llama(), ia3fx.IA3Config(**TENANTS[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        ia3.add_adapter(name, ia3fx.IA3Config(**TENANTS[name]))
    for seed, name in enumerate(names):
        randomize(ia3, name, seed)

    # 1. a training step on a mixed batch
    ia3.train()
    ia3.set_requires_grad(names[:2])
    batch = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    rows = ["support", "sql", "__base__", "support"]
    ia3(input_ids=batch, labels=batch, adapter_names=rows).loss.backward()
    for name in names[:2]:
        grads = [p.grad for p in ia3.ia3_l[name].parameters()]
        got = all(g is not None and g.abs().sum() > 0 for g in grads)
        print(f"mixed training batch: {name}'s {len(grads)} vectors got a gradient from its rows: {got}")
        ok &= got
    ia3.zero_grad(set_to_none=True)
    ia3.eval()

    # 2. one ONNX decoder for every tenant
    t0 = time.perf_counter()
    path = ia3fx.export(ia3, os.path.join(out, "served.onnx"), "onnx", for_generation=True,
                        adapters=names[:2], overwrite=True)
    table = ["__base__", *ia3fx.read_manifest(path)["adapters"]]
    print(f"exported {os.path.basename(path)} with a table of {len(table) - 1} adapters in {time.perf_counter() - t0:.1f} s")

    # 3. a queue of requests, served four at a time
    g = torch.Generator().manual_seed(2)
    requests = deque((name, torch.randint(1, 128, (6,), generator=g))
                     for name in ["sql", "support", "__base__", "sql", "support", "support", "__base__", "sql"])

    def serve(queue: deque, path: str, table: list[str]) -> bool:
        good = True
        while queue:
            chunk = [queue.popleft() for _ in range(min(4, len(queue)))]
            who = [name for name, _ in chunk]
            prompts = torch.stack([p for _, p in chunk])
            tokens = greedy_onnx(path, prompts, NEW, adapter_index=[table.index(n) for n in who])
            want = ia3.generate(prompts, adapter_names=who, max_new_tokens=NEW, do_sample=False)
            same = torch.equal(tokens, want)
            print(f"  served {who}: {'equal to' if same else 'MISMATCH with'} generate(adapter_names=...)")
            good &= same
        return good

    ok &= serve(requests, path, table)
    prompt = torch.randint(1, 128, (1, 6), generator=g).expand(3, 6)
    answers = ia3.generate(prompt, adapter_names=["support", "sql", "__base__"], max_new_tokens=NEW, do_sample=False)
    differ = len({tuple(a.tolist()) for a in answers}) == 3
    print(f"one prompt, three tenants: three different answers: {differ}")
    ok &= differ

    # 4. a new tenant, added to the deployed file
    ia3.save_pretrained(os.path.join(out, "adapters"), selected_adapters=["legal"])
    t0 = time.perf_counter()
    more = ia3fx.swap_adapter(path, os.path.join(out, "adapters", "legal"), os.path.join(out, "served-more.onnx"),
                              adapter_name="legal", overwrite=True)
    table = ["__base__", *ia3fx.read_manifest(more)["adapters"]]
    print(f"added 'legal' as table row {table.index('legal')} in {time.perf_counter() - t0:.2f} s (no re-export)")
    ok &= serve(deque([("legal", prompt[0]), ("sql", prompt[0]), ("legal", prompt[0])]), more, table)

    if not ok:
        print("FAILED: see the mismatches above")
        return 1
    print(f"OK: one ONNX model served {len(table) - 1} adapters per request, equal to generate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
