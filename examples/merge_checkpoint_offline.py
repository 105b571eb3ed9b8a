"""Merge an (IA)³ adapter into a checkpoint on disk, without loading the model's weights.

A tiny Llama (ia3fx's ``tiny-llama`` preset, random weights) is saved as a sharded transformers
checkpoint, an adapter with non-trivial vectors is saved in PEFT's format, and
``ia3fx.merge_checkpoint`` writes the merged checkpoint. The merged directory then loads with plain
transformers (no ia3fx, no PEFT) and gives the adapted model's logits.

    python examples/merge_checkpoint_offline.py [--workdir DIR]

The same from the shell:

    ia3fx merge --base DIR/base --adapter DIR/adapter --out DIR/merged [--force]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

import ia3fx
from ia3fx.presets import build_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write base/, adapter/ and merged/ (default: a temporary dir)")
    args = parser.parse_args()
    if args.workdir:
        run(args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="ia3fx-offline-merge-") as workdir:
            run(workdir)


def run(workdir: str) -> None:
    base, adapter, merged = (os.path.join(workdir, d) for d in ("base", "adapter", "merged"))

    # 1. a base checkpoint, as transformers writes it (several shards + model.safetensors.index.json)
    model = build_preset("tiny-llama")
    model.save_pretrained(base, max_shard_size="100KB")
    shards = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    print(f"base: {len(shards)} shards in {base}")

    # 2. an adapter in PEFT's format (here: random vectors standing in for trained ones)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config(), example_inputs={"input_ids": ids})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in ia3.targets:
            v = ia3.get_vector(name)
            v.copy_(1.0 + 0.3 * torch.randn(v.shape, generator=g))
        expected = ia3(input_ids=ids).logits
    ia3.save_pretrained(adapter)
    print(f"adapter: {len(ia3.targets)} vectors in {adapter}")

    # 3. the offline merge: headers parsed, shards streamed, adapted weights folded
    report = ia3fx.merge_checkpoint(base, adapter, merged, force=True)
    print(report.summary())

    # 4. the merged checkpoint is a plain transformers model
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    diff = (got - expected).abs().max().item()
    print(f"merged model vs adapted model: max |logit difference| = {diff:.2e}")
    assert diff < 1e-5, diff
    print(f"files in {merged}: {', '.join(sorted(os.listdir(merged)))}")
    print("OK: merged offline; the merged checkpoint loads with plain transformers and gives the adapted logits")


if __name__ == "__main__":
    main()
