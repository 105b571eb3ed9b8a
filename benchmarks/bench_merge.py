"""Merging: the merged model's forward vs the base model's, and the cost of merging vs PEFT's.

A Llama-shaped model (4 layers, hidden 512, intermediate 1376, 8 heads, vocab 1000, random
weights, fp32, CPU) with PEFT's default Llama targets and the same random vectors on both sides
(PEFT's state dict loaded into ia3fx; the script checks the merged weights are bit-identical).

Forward, a batch of 4 x 128 tokens under ``torch.no_grad()`` (target: 1.00 within noise):

* ``base``: the eager transformers model;
* ``merged graph``: ``IA3Model.merged_graph_module()``, the fold pass's GraphModule;
* ``merge_and_unload``: the model ``IA3Model.merge_and_unload()`` returns (the user's class);
* ``merged in place``: the ``IA3Model`` after ``merge_adapter()`` (its graph multiplies by ones).

Merge time, in memory (target: <= 1.0 x PEFT's ``merge_and_unload``):

* ``ia3fx merge_adapter``: folds in place, keeps the originals (unmerged, untimed, between calls);
* ``ia3fx merge_and_unload``: on a fresh deep copy of the adapted model each call (copy untimed);
* ``peft merge_and_unload``: on a fresh deep copy of the PEFT model each call (copy untimed).

Method (the machine is shared and noisy): every contender runs in every round, in an order that
reverses each round, a round keeps each contender's best of ``reps`` calls, and a figure is the
median over rounds of the per-round ratio. By default the clock is this process's CPU time with
one torch thread, which other processes on a busy machine barely disturb; ``--clock wall
--threads N`` measures elapsed time instead (on a quiet machine).

    python benchmarks/bench_merge.py            # 11 rounds, results/merge.json
    python benchmarks/bench_merge.py --quick    # 2 layers, batch 2 x 64, 3 rounds (< 2 min)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

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

FORWARD_TARGET = 1.00  # within noise
MERGE_TARGET = 1.00


def build(args: argparse.Namespace):
    import peft
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
    base = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config()).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    adapted = ia3fx.get_ia3_model(copy.deepcopy(base), ia3fx.IA3Config(), example_inputs={"input_ids": ids})
    adapted.load_adapter_state_dict(peft.get_peft_model_state_dict(peft_model))
    return base, peft_model, adapted, ids


def check(base, peft_model, adapted, ids) -> float:
    """Merged weights bit-identical to PEFT's; merged logits equal to the adapted ones."""
    peft_sd = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    merged = copy.deepcopy(adapted).merge_and_unload().state_dict()
    bad = [k for k, v in merged.items() if not torch.equal(v, peft_sd[k])]
    if bad:
        raise AssertionError(f"merged weights differ from PEFT's: {bad[:3]}")
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = adapted.merged_graph_module()(input_ids=ids).logits
    diff = (got - want).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"merged graph disagrees with the adapted model: {diff}")
    return diff


def alternate_prepared(
    contenders: dict[str, tuple[Callable[[], object], Callable[[object], object], Callable[[object], object]]],
    rounds: int,
    reps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Like ``_common.alternate``, but each call gets a prepared object and cleans up after itself,
    neither timed: ``(prepare, run, cleanup)`` per contender."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            prepare, run, cleanup = contenders[name]
            best = float("inf")
            for _ in range(reps):
                obj = prepare()
                t0 = clock()
                run(obj)
                best = min(best, clock() - t0)
                cleanup(obj)
            times[name].append(best)
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 64, 3 rounds")
    p.add_argument("--rounds", type=int)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--merge-reps", type=int, default=3)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU time (robust on a shared machine; default); wall: elapsed time")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    args.layers, args.hidden, args.intermediate, args.heads, args.vocab = 4, 512, 1376, 8, 1000
    args.batch, args.seq = 4, 128
    if args.quick:
        args.layers, args.batch, args.seq = 2, 2, 64
    rounds = args.rounds or (3 if args.quick else 11)

    print(f"building: Llama {args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}", file=sys.stderr)
    base, peft_model, adapted, ids = build(args)
    diff = check(base, peft_model, adapted, ids)

    # --- forward -----------------------------------------------------------------------------------
    merged_graph = adapted.merged_graph_module()
    in_place = copy.deepcopy(adapted)
    in_place.merge_adapter()
    unloaded = copy.deepcopy(adapted).merge_and_unload()
    forward = {
        "base": base,
        "merged graph": merged_graph,
        "merge_and_unload": unloaded,
        "merged in place": in_place,
    }

    def call(model):
        return lambda: model(input_ids=ids)

    with torch.no_grad():
        for model in forward.values():  # warm-up (the graphs generate their code on first call)
            model(input_ids=ids)
        print("forward:", file=sys.stderr)
        fwd_times = alternate({k: call(m) for k, m in forward.items()}, rounds, args.reps, clock=clock)
    fwd_ratios = [ratio(fwd_times, name, "base") for name in forward if name != "base"]

    # --- merge time --------------------------------------------------------------------------------
    def nothing(obj):
        return None

    merge = {
        "ia3fx merge_adapter": (lambda: adapted, lambda m: m.merge_adapter(), lambda m: m.unmerge_adapter()),
        "ia3fx merge_and_unload": (lambda: copy.deepcopy(adapted), lambda m: m.merge_and_unload(), nothing),
        "peft merge_and_unload": (lambda: copy.deepcopy(peft_model), lambda m: m.merge_and_unload(), nothing),
    }
    print("merge:", file=sys.stderr)
    merge_times = alternate_prepared(merge, rounds, args.merge_reps, clock=clock)
    merge_ratios = [
        ratio(merge_times, "ia3fx merge_adapter", "peft merge_and_unload"),
        ratio(merge_times, "ia3fx merge_and_unload", "peft merge_and_unload"),
    ]

    targets = {r["ratio"]: FORWARD_TARGET for r in fwd_ratios}
    targets.update({r["ratio"]: MERGE_TARGET for r in merge_ratios})
    print(table(time_rows(fwd_times, "ms")))
    print()
    print(table(time_rows(merge_times, "ms")))
    print()
    print(ratio_lines(fwd_ratios + merge_ratios, targets))
    path = write_json(
        "merge_quick" if args.quick else "merge",
        {
            "figure": "merged forward vs base; in-memory merge time vs PEFT merge_and_unload",
            "command": command(),
            "model": (
                f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
                f"{args.heads} heads, vocab {args.vocab}, fp32, CPU; batch {args.batch} x seq {args.seq}, "
                "no_grad, eval; PEFT's default Llama targets (k_proj, v_proj, down_proj), random vectors"
            ),
            "method": (
                f"{rounds} rounds, order reversed each round, best of {args.reps} forward calls / "
                f"{args.merge_reps} merges per contender per round (deep copies and unmerges untimed); "
                f"clock: {'process CPU time' if args.clock == 'cpu' else 'wall time'}, {args.threads} torch "
                "thread(s); ratios are medians of per-round ratios"
            ),
            "checks": {"merged weights == PEFT merge_and_unload": "bit-identical", "max |merged - adapted logits|": diff},
            "targets": targets,
            "ratios": fwd_ratios + merge_ratios,
            "times_s": {**fwd_times, **merge_times},
            "machine": machine(),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
