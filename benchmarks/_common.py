"""Shared by bench_forward.py, bench_train.py and bench_apply.py: models, timing method, output.

Timing method (the machine is shared and noisy): every contender runs in every round, in an order
that reverses from one round to the next, and a round keeps each contender's best of ``reps``
calls. A figure is the median over rounds of the per-round ratio of two contenders, so slow
phases of the machine hit both sides of a ratio alike.
"""

from __future__ import annotations

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


def alternate(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    reps: int,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Per contender, one time per round: the best of ``reps`` calls; the order flips every round."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = contenders[name]
            best = float("inf")
            for _ in range(reps):
                t0 = clock()
                fn()
                best = min(best, clock() - t0)
            times[name].append(best)
        if progress:
            print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, object]:
    """Median and quartiles of the per-round ratios ``num / den``."""
    per_round = [a / b for a, b in zip(times[num], times[den], strict=True)]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {
        "ratio": f"{num} / {den}",
        "median": round(statistics.median(per_round), 4),
        "q1": round(q[0], 4),
        "q3": round(q[2], 4),
        "rounds": [round(x, 4) for x in per_round],
    }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def time_rows(times: dict[str, list[float]], unit: str = "ms") -> list[tuple[str, ...]]:
    scale = {"ms": 1e3, "s": 1.0}[unit]
    rows = [("contender", f"median ({unit})", f"best ({unit})")]
    for name, ts in times.items():
        rows.append((name, f"{statistics.median(ts) * scale:.2f}", f"{min(ts) * scale:.2f}"))
    return rows


def ratio_lines(ratios: list[dict[str, object]], targets: dict[str, float]) -> str:
    lines = []
    for r in ratios:
        target = targets.get(str(r["ratio"]))
        verdict = ""
        if target is not None:
            verdict = f"   target <= {target:.2f}: {'met' if r['median'] <= target else 'MISSED'}"
        lines.append(f"{r['ratio']:<28} median {r['median']:.3f}  (q1 {r['q1']:.3f}, q3 {r['q3']:.3f}){verdict}")
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
