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

    python benchmarks/bench_forward.py            # 15 rounds, results/forward.json
    python benchmarks/bench_forward.py --quick    # small model, 3 rounds (smoke test, < 60 s)
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from _common import (
    alternate,
    command,
    llama_config,
    machine,
    ratio,
    ratio_lines,
    table,
    time_rows,
    write_json,
)

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 256, 4 x 64 tokens, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="default 15 (3 with --quick)")
    p.add_argument("--reps", type=int, default=3, help="calls per contender per round; the best counts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--name", default="forward", help="results/<name>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.seq = 2, 256, 688, 64
        args.rounds, args.reps = args.rounds or 3, 2
        if args.name == "forward":
            args.name = "forward_quick"
    args.rounds = args.rounds or 15
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine()
    models, ids, diff = build(args)
    calls = {name: (lambda m=m: m(input_ids=ids)) for name, m in models.items()}
    with torch.no_grad():
        for fn in calls.values():  # warm-up (and ia3fx's one-time code generation)
            fn()
            fn()
        times = alternate(calls, args.rounds, args.reps)

    ratios = [
        ratio(times, "ia3fx", "base"),
        ratio(times, "ia3fx", "peft"),
        ratio(times, "exported", "base"),
        ratio(times, "exported+cleanup", "base"),
        ratio(times, "peft", "base"),
    ]
    targets = {"ia3fx / base": 1.02, "ia3fx / peft": 1.00}
    model = (
        f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}, fp32, CPU; batch {args.batch} x seq {args.seq}, no_grad, eval"
    )
    print(model)
    print(table(time_rows(times)))
    print(ratio_lines(ratios, targets))
    print(f"max |ia3fx - peft| logits with the same random vectors: {diff:.2e}")
    path = write_json(
        args.name,
        {
            "figure": "eval forward, adapted vs base (eager) and vs PEFT IA3",
            "command": command(),
            "model": model,
            "method": f"{args.rounds} rounds, order reversed each round, best of {args.reps} calls per "
            "contender per round; ratios are medians of per-round ratios",
            "targets": targets,
            "ratios": ratios,
            "seconds": {k: [round(t, 5) for t in v] for k, v in times.items()},
            "max_abs_logit_diff_ia3fx_vs_peft": diff,
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
