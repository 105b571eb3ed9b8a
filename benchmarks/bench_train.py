"""Figure (b): one training step of an ia3fx-adapted model vs PEFT's IA3.

The same Llama-shaped model as figure (a) (4 layers, hidden 512, intermediate 1376, 8 heads, vocab
1000, random fp32 weights, CPU; Llama's default dropout of 0), in train mode, batch 4 x 128 tokens.
A step is ``zero_grad`` + forward with ``labels`` (transformers' causal-LM loss) + ``backward``
into the (IA)³ vectors + ``AdamW.step`` on the vectors; the base weights are frozen on both sides.
Contenders: ``ia3fx`` (``get_ia3_model`` on the model in train mode) and ``peft``
(``peft.get_peft_model(copy, peft.IA3Config())``). Both start from the same vectors (ones) and take
the same number of steps on the same batch, so the script also checks that their vectors still
agree at the end. Target: ``ia3fx / peft <= 1.00``.

    python benchmarks/bench_train.py            # 15 rounds, results/train.json
    python benchmarks/bench_train.py --quick    # small model, 3 rounds (smoke test, < 60 s)
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
from ia3fx.model import PEFT_PREFIX


def trainer(model: torch.nn.Module, ids: torch.Tensor, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    return step, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 256, 4 x 64 tokens, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="default 15 (3 with --quick)")
    p.add_argument("--reps", type=int, default=3, help="steps per contender per round; the best counts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--name", default="train", help="results/<name>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.seq = 2, 256, 688, 64
        args.rounds, args.reps = args.rounds or 3, 2
        if args.name == "train":
            args.name = "train_quick"
    args.rounds = args.rounds or 15
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()

    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    base = LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config())
    peft_model.train()
    adapted = ia3fx.get_ia3_model(base, ia3fx.IA3Config(), example_inputs={"input_ids": ids, "labels": ids})
    adapted.train()

    steps = {"ia3fx": trainer(adapted, ids, args.lr), "peft": trainer(peft_model, ids, args.lr)}
    n_params = {k: sum(p.numel() for p in ps) for k, (_, ps) in steps.items()}
    if n_params["ia3fx"] != n_params["peft"]:
        raise AssertionError(f"different trainable parameter counts: {n_params}")
    calls = {k: fn for k, (fn, _) in steps.items()}
    for fn in calls.values():  # warm-up (and ia3fx's one-time code generation)
        fn()
        fn()
    times = alternate(calls, args.rounds, args.reps)

    # same steps from the same start: the vectors must still agree
    ours = {k.removeprefix(PEFT_PREFIX): v for k, v in adapted.adapter_state_dict().items()}
    theirs = {
        k.removeprefix(PEFT_PREFIX): v for k, v in peft.get_peft_model_state_dict(peft_model).items()
    }
    drift = max((ours[k] - theirs[k].reshape(ours[k].shape)).abs().max().item() for k in ours)
    if set(ours) != set(theirs) or drift > 1e-3:
        raise AssertionError(f"ia3fx and PEFT trained apart: max |vector difference| = {drift}")

    ratios = [ratio(times, "ia3fx", "peft")]
    targets = {"ia3fx / peft": 1.00}
    model = (
        f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}, fp32, CPU; batch {args.batch} x seq {args.seq}, train mode, "
        f"dropout 0; AdamW on {n_params['ia3fx']:,d} (IA)3 parameters"
    )
    print(model)
    print(table(time_rows(times)))
    print(ratio_lines(ratios, targets))
    total_steps = 2 + args.rounds * args.reps
    print(f"max |ia3fx - peft| vector after {total_steps} identical steps each: {drift:.2e}")
    path = write_json(
        args.name,
        {
            "figure": "train step (forward + backward + AdamW step on the vectors), ia3fx vs PEFT IA3",
            "command": command(),
            "model": model,
            "method": f"{args.rounds} rounds, order reversed each round, best of {args.reps} steps per "
            "contender per round; the ratio is the median of per-round ratios",
            "targets": targets,
            "ratios": ratios,
            "seconds": {k: [round(t, 5) for t in v] for k, v in times.items()},
            "max_abs_vector_diff_after_training": drift,
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
