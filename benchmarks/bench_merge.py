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

Method: ``_common.alternate`` (contenders take turns call by call, the order reversing at every
turn; a round keeps each one's best of ``reps`` calls; figures are medians of per-round ratios),
on this process's CPU time with one torch thread (primary: other processes on a busy machine
barely disturb it) and on wall clock beside it.

    python benchmarks/bench_merge.py            # 11 rounds, results/merge.json
    python benchmarks/bench_merge.py --quick    # 2 layers, batch 2 x 64, 3 rounds (< 2 min)
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
    randomize_peft_vectors,
    ratio_lines,
    ratios_both,
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
    randomize_peft_vectors(peft_model)
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, batch 2 x 64, 3 rounds")
    p.add_argument("--rounds", type=int)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--merge-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
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
        fwd_wall, fwd_cpu = alternate({k: call(m) for k, m in forward.items()}, rounds, args.reps)
    fwd_ratios = ratios_both(fwd_wall, fwd_cpu, [(name, "base") for name in forward if name != "base"])

    # --- merge time --------------------------------------------------------------------------------
    def nothing(obj):
        return None

    merge = {
        "ia3fx merge_adapter": (lambda: adapted, lambda m: m.merge_adapter(), lambda m: m.unmerge_adapter()),
        "ia3fx merge_and_unload": (lambda: copy.deepcopy(adapted), lambda m: m.merge_and_unload(), nothing),
        "peft merge_and_unload": (lambda: copy.deepcopy(peft_model), lambda m: m.merge_and_unload(), nothing),
    }
    print("merge:", file=sys.stderr)
    merge_wall, merge_cpu = alternate(merge, rounds, args.merge_reps)
    merge_ratios = ratios_both(
        merge_wall, merge_cpu,
        [("ia3fx merge_adapter", "peft merge_and_unload"), ("ia3fx merge_and_unload", "peft merge_and_unload")],
    )

    targets = {r["ratio"]: FORWARD_TARGET for r in fwd_ratios}
    targets.update({r["ratio"]: MERGE_TARGET for r in merge_ratios})
    print(table(time_rows(fwd_wall, fwd_cpu)))
    print()
    print(table(time_rows(merge_wall, merge_cpu)))
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
                f"{rounds} rounds; within a round the contenders take turns call by call, the order "
                f"reversing every turn, best of {args.reps} forward calls / {args.merge_reps} merges each "
                f"(deep copies and unmerges untimed); {args.threads} torch thread(s); ratios are medians "
                "of per-round ratios, on CPU time (primary) and wall clock"
            ),
            "checks": {"merged weights == PEFT merge_and_unload": "bit-identical", "max |merged - adapted logits|": diff},
            "targets": targets,
            "ratios": fwd_ratios + merge_ratios,
            "seconds_wall": {**fwd_wall, **merge_wall},
            "seconds_cpu": {**fwd_cpu, **merge_cpu},
            "machine": machine(),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
