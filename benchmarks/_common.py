"""Shared by bench_forward.py, bench_train.py, bench_merge.py and bench_apply.py: models, timing, output.

Timing method (the machine is shared and noisy): every contender runs in every round, the
contenders taking turns call by call in an order that reverses at every turn, and a round keeps
each contender's best of ``reps`` calls. A figure is the median over rounds of the per-round ratio
of two contenders, so slow phases of the machine hit both sides of a ratio alike. Times are taken
both as wall clock and as process CPU time; with one intra-op thread (the default here) CPU time
leaves out the time the process waits for a core, the main noise on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def llama_config(
    layers: int = 4,
    hidden: int = 512,
    intermediate: int = 1376,
    heads: int = 8,
    vocab: int = 1000,
    **extra: object,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        use_cache=False,  # the same work on every side: ia3fx traces without a KV cache
        **extra,
    )


def parse_model_args(
    description: str, name: str, rounds: int, reps: int, argv: list[str] | None, extra: Callable | None = None
) -> argparse.Namespace:
    """The options bench_forward.py and bench_train.py share: the Llama shape, the batch, rounds."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 256, 4 x 64 tokens, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help=f"default {rounds} (3 with --quick)")
    p.add_argument("--reps", type=int, default=reps, help="calls per contender per round; the best counts")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0 keeps torch's default")
    p.add_argument("--name", default=name, help="results/<name>.json")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.seq = 2, 256, 688, 64
        args.rounds, args.reps = args.rounds or 3, 2
        if args.name == name:
            args.name = f"{name}_quick"
    args.rounds = args.rounds or rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def model_title(args: argparse.Namespace, what: str) -> str:
    return (
        f"LlamaForCausalLM {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
        f"{args.heads} heads, vocab {args.vocab}, fp32, CPU; batch {args.batch} x seq {args.seq}, {what}"
    )


def report(
    args: argparse.Namespace,
    figure: str,
    model: str,
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    pairs: list[tuple[str, str]],
    targets: dict[str, float],
    info: dict[str, object],
    **extra: object,
) -> str:
    """Print the times and ratios, and write them with the method to results/<args.name>.json."""
    ratios = ratios_both(wall, cpu, pairs)
    print(model)
    print(table(time_rows(wall, cpu)))
    print(ratio_lines(ratios, targets))
    return write_json(
        args.name,
        {
            "figure": figure,
            "command": command(),
            "model": model,
            "method": f"{args.rounds} rounds; within a round the contenders take turns call by call, "
            f"the order reversing every turn, best of {args.reps} calls each; ratios are medians of "
            "per-round ratios, on CPU time (primary, 1 intra-op thread) and wall clock",
            "threads": torch.get_num_threads(),
            "targets": targets,
            "ratios": ratios,
            "seconds_wall": {k: [round(t, 5) for t in v] for k, v in wall.items()},
            "seconds_cpu": {k: [round(t, 5) for t in v] for k, v in cpu.items()},
            **extra,
            "machine": info,
        },
    )


def _nothing(obj: object = None) -> None:
    return None


def alternate(
    contenders: dict[str, Callable[[], object] | tuple[Callable[[], object], Callable[[object], object], Callable[[object], object]]],
    rounds: int,
    reps: int,
    progress: bool = True,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per contender and round, the best of ``reps`` calls, in wall-clock and in CPU seconds.

    Within a round the contenders take turns call by call (A B C, C B A, A B C, ...), so a slow
    spell of the machine lands on all of them; the best call of each then stands for the round.
    A contender is a function to time, or ``(prepare, run, cleanup)``: only ``run(prepare())``
    is timed, and ``cleanup`` gets the prepared object after it (a fresh copy to merge, say).
    """
    names = list(contenders)
    steps = {
        n: c if isinstance(c, tuple) else (_nothing, lambda _, fn=c: fn(), _nothing) for n, c in contenders.items()
    }
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    turn = 0
    for r in range(rounds):
        best_wall = dict.fromkeys(names, float("inf"))
        best_cpu = dict.fromkeys(names, float("inf"))
        for _ in range(reps):
            for name in names if turn % 2 == 0 else names[::-1]:
                prepare, run, cleanup = steps[name]
                obj = prepare()
                w0, c0 = time.perf_counter(), time.process_time()
                run(obj)
                best_wall[name] = min(best_wall[name], time.perf_counter() - w0)
                best_cpu[name] = min(best_cpu[name], time.process_time() - c0)
                cleanup(obj)
            turn += 1
        for n in names:
            wall[n].append(best_wall[n])
            cpu[n].append(best_cpu[n])
        if progress:
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return wall, cpu


def ratio(times: dict[str, list[float]], num: str, den: str, clock: str) -> dict[str, object]:
    """Median and quartiles of the per-round ratios ``num / den`` on one clock ("wall" or "cpu")."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {
        "ratio": f"{num} / {den}",
        "clock": clock,
        "median": round(statistics.median(per_round), 4),
        "q1": round(q[0], 4),
        "q3": round(q[2], 4),
        "rounds": [round(x, 4) for x in per_round],
    }


def ratios_both(wall: dict, cpu: dict, pairs: list[tuple[str, str]]) -> list[dict[str, object]]:
    return [ratio(t, num, den, clock) for num, den in pairs for clock, t in (("cpu", cpu), ("wall", wall))]


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def time_rows(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> list[tuple[str, ...]]:
    rows = [("contender", "cpu ms (median)", "cpu ms (best)", "wall ms (median)", "wall ms (best)")]
    for name in wall:
        c, w = cpu[name], wall[name]
        rows.append((
            name,
            f"{statistics.median(c) * 1e3:.2f}", f"{min(c) * 1e3:.2f}",
            f"{statistics.median(w) * 1e3:.2f}", f"{min(w) * 1e3:.2f}",
        ))
    return rows


def ratio_lines(ratios: list[dict[str, object]], targets: dict[str, float]) -> str:
    lines = []
    for r in ratios:
        target = targets.get(str(r["ratio"]))
        verdict = ""
        if target is not None:
            verdict = f"   target <= {target:.2f}: {'met' if r['median'] <= target else 'MISSED'}"
        name = f"{r['ratio']} ({r['clock']})"
        lines.append(f"{name:<32} median {r['median']:.3f}  (q1 {r['q1']:.3f}, q3 {r['q3']:.3f}){verdict}")
    return "\n".join(lines)


def machine() -> dict[str, object]:
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = None
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_start": load,
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def write_json(name: str, data: dict[str, object]) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], os.path.dirname(HERE))] + sys.argv[1:])


def randomize_peft_vectors(peft_model, seed: int = 2) -> None:
    """PEFT's IA3 vectors uniform in [0.5, 1.5]: an adapter that changes every output."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
