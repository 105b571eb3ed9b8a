"""Figure (b): one training step of an ia3fx-adapted model vs PEFT's IA3.

The same Llama-shaped model as figure (a) (4 layers, hidden 512, intermediate 1376, 8 heads, vocab
1000, random fp32 weights, CPU; Llama's default dropout of 0), in train mode, batch 4 x 128 tokens.
A step is ``zero_grad`` + forward with ``labels`` (transformers' causal-LM loss) + ``backward``
into the (IA)³ vectors + ``AdamW.step`` on the vectors; the base weights are frozen on both sides.
Contenders: ``ia3fx`` (``get_ia3_model`` on the model in train mode) and ``peft``
(``peft.get_peft_model(copy, peft.IA3Config())``). Both start from the same vectors (ones) and take
the same number of steps on the same batch, so the script also checks that their vectors still
agree at the end. Target: ``ia3fx / peft <= 1.00``.

    python benchmarks/bench_train.py            # 150 rounds of one step each, results/train.json
    python benchmarks/bench_train.py --quick    # small model, 3 rounds (smoke test, < 60 s)
"""

from __future__ import annotations

import copy
import sys

import torch
from _common import alternate, llama_config, machine, model_title, parse_model_args, report

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
    args = parse_model_args(
        __doc__.splitlines()[0], "train", rounds=150, reps=1, argv=argv,
        extra=lambda p: p.add_argument("--lr", type=float, default=1e-3),
    )
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
    wall, cpu = alternate(calls, args.rounds, args.reps)

    # same steps from the same start: the vectors must still agree
    ours = {k.removeprefix(PEFT_PREFIX): v for k, v in adapted.adapter_state_dict().items()}
    theirs = {
        k.removeprefix(PEFT_PREFIX): v for k, v in peft.get_peft_model_state_dict(peft_model).items()
    }
    drift = max((ours[k] - theirs[k].reshape(ours[k].shape)).abs().max().item() for k in ours)
    if set(ours) != set(theirs) or drift > 1e-3:
        raise AssertionError(f"ia3fx and PEFT trained apart: max |vector difference| = {drift}")

    model = model_title(args, f"train mode, dropout 0; AdamW on {n_params['ia3fx']:,d} (IA)3 parameters")
    path = report(
        args, "train step (forward + backward + AdamW step on the vectors), ia3fx vs PEFT IA3", model, wall, cpu,
        [("ia3fx", "peft")], {"ia3fx / peft": 1.00}, info, max_abs_vector_diff_after_training=drift,
    )
    total_steps = 2 + args.rounds * args.reps
    print(f"max |ia3fx - peft| vector after {total_steps} identical steps each: {drift:.2e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
