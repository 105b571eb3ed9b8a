"""Figure (a): eval forward of an ia3fx-adapted model vs the base model and vs PEFT's IA3.

A Llama-shaped model (4 layers, hidden 512, intermediate 1376, 8 heads, vocab 1000, random
weights, fp32, CPU) runs a batch of 4 x 128 tokens under ``torch.no_grad()``. Contenders:

* ``base``: the eager transformers model;
* ``exported``: the plain ``torch.export`` graph ia3fx starts from (``ia3fx.trace``), unchanged;
* ``exported+cleanup``: that graph after ``ia3fx.passes.cleanup_graph``, still without (IA)³;
* ``ia3fx``: ``ia3fx.get_ia3_model(model, IA3Config())``, what users run;
* ``peft``: ``peft.get_peft_model(copy, peft.IA3Config())`` on a copy of the same weights.

Both adapters get the same random vectors (PEFT's state dict loaded into ia3fx), and the script
checks that their logits agree before timing. Targets: ``ia3fx / base <= 1.02`` and
``ia3fx / peft <= 1.00``.

    python benchmarks/bench_forward.py            # 21 rounds, results/forward.json
    python benchmarks/bench_forward.py --quick    # small model, 3 rounds (smoke test, < 60 s)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _common import alternate, llama_config, machine, model_title, parse_model_args, report

import ia3fx
from ia3fx.passes import cleanup_graph


def build(args: argparse.Namespace) -> tuple[dict, torch.Tensor, float]:
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).eval()
    exported = ia3fx.trace(base, {"input_ids": ids}, train=False)
    cleaned, _ = cleanup_graph(ia3fx.trace(base, {"input_ids": ids}, train=False))
    adapted = ia3fx.get_ia3_model(base, ia3fx.IA3Config(), example_inputs={"input_ids": ids})

    # the same (random) vectors on both sides, and the same logits
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    adapted.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    with torch.no_grad():
        diff = (adapted(input_ids=ids).logits - peft_model(input_ids=ids).logits).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"ia3fx and PEFT disagree: max |logits difference| = {diff}")
    models = {"base": base, "exported": exported, "exported+cleanup": cleaned, "ia3fx": adapted, "peft": peft_model}
    return models, ids, diff


def main(argv: list[str] | None = None) -> int:
    args = parse_model_args(__doc__.splitlines()[0], "forward", rounds=21, reps=5, argv=argv)
    info = machine()
    models, ids, diff = build(args)
    calls = {name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()}
    with torch.no_grad():
        for fn in calls.values():  # warm-up (and ia3fx's one-time code generation)
            fn()
            fn()
        wall, cpu = alternate(calls, args.rounds, args.reps)

    model = model_title(args, "no_grad, eval")
    path = report(
        args, "eval forward, adapted vs base (eager) and vs PEFT IA3", model, wall, cpu,
        [("ia3fx", "base"), ("ia3fx", "peft"), ("exported", "base"), ("exported+cleanup", "base"), ("peft", "base")],
        {"ia3fx / base": 1.02, "ia3fx / peft": 1.00}, info, max_abs_logit_diff_ia3fx_vs_peft=diff,
    )
    print(f"max |ia3fx - peft| logits with the same random vectors: {diff:.2e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
