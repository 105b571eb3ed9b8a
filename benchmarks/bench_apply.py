"""Figure (c): what applying ia3fx to a 7B-shaped Llama costs, in time and memory.

The model is a 32-layer Llama with 7B shapes (hidden 4096, intermediate 11008, 32 heads, vocab
32000) built on the meta device, so no weights are allocated; example input 2 x 16 token ids.
Contenders, alternated in every round with the order reversed each round:

* ``export_static``: a bare ``torch.export.export(model, (), {"input_ids": ids})``;
* ``export_dynamic``: the same with the dynamic batch and sequence dims ia3fx asks for
  (``Dim.AUTO`` on dims 0 and 1: the graph then serves any batch size and length);
* ``get_ia3_model``: the whole ``ia3fx.get_ia3_model(model, IA3Config(), example_inputs=...)``,
  dynamic batch and length (the default);
* ``get_ia3_model_static``: the same with ``dynamic=False`` (every size fixed, retraced per shape),
  the like-for-like peer of ``export_static``.

``get_ia3_model`` includes ``ExportedProgram.module()`` (about 1 s here, mostly code generation),
which a bare export leaves to its user; so its ratio is also given against ``export_dynamic``
plus that ``.module()`` call, timed on the same program in the same round.

torch.export's symbolic shape reasoning makes ``export_dynamic`` 2-3x ``export_static``; that cost
is torch's, paid by anyone who wants a graph for every batch size and length. So each ia3fx
contender is compared with the bare export that traces the same way.

Within ``get_ia3_model`` the *rewrite* is everything ``IA3Model.__init__`` does after ``trace()``
returns (call sites, PEFT targeting, vectors, cleanup, insert_scales, binding), timed by wrapping
``ia3fx.model.trace``. ia3fx defers the Python code generation of the rewritten graph (and its
``lint()``) to its first call; that one-time cost is reported separately (``codegen``). Peak memory is the RSS high-water
mark (``VmHWM``) of a fresh subprocess that imports, builds the meta model and runs
``get_ia3_model`` once (and, for comparison, of one that runs only the bare export).

Targets: rewrite < 100 ms; get_ia3_model / export_dynamic and get_ia3_model_static /
export_static <= 1.2; peak RSS < 1 GB. Times are wall
clock; CPU time (``time.process_time``) ratios are reported beside them, being steadier on a
shared machine.

    python benchmarks/bench_apply.py            # 32 layers, 5 rounds, results/apply.json
    python benchmarks/bench_apply.py --quick    # 1 layer, 1 round (smoke test, < 60 s)
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import command, llama_config, machine, table, write_json

import ia3fx
import ia3fx.model as ia3fx_model
from ia3fx.passes._lazy import realize

SEVEN_B = dict(hidden=4096, intermediate=11008, heads=32, vocab=32000)


def meta_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    cfg = llama_config(layers, **SEVEN_B)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return model.eval()


def example() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))}


def dynamic_shapes() -> dict:
    from torch.export import Dim

    return {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}  # what ia3fx.trace asks for on token inputs


def peak_rss_mb() -> float:
    """This process's RSS high-water mark. ``VmHWM`` where there is /proc: ``ru_maxrss`` of a fresh
    subprocess also counts the parent's RSS at fork time (Linux keeps the maximum across exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(what: str, layers: int) -> None:
    """Run in a fresh process: report the RSS high-water mark of one apply (or one bare export)."""
    after_import = peak_rss_mb()
    model = meta_llama(layers)
    inputs = example()
    if what == "apply":
        adapted = ia3fx.get_ia3_model(model, ia3fx.IA3Config(), example_inputs=inputs)
        realize(adapted.graph_module)  # include the deferred code generation
    else:
        torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes())
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "after_import_mb": round(after_import, 1)}))


def measure_child(what: str, layers: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, "--layers", str(layers)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


class Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 layer, 1 round, no export-only memory run")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 1 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="default 5 (1 with --quick)")
    p.add_argument("--child", choices=["apply", "export"], help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help="results/<name>.json (default apply, apply_quick)")
    args = p.parse_args(argv)
    layers = args.layers or (1 if args.quick else 32)
    if args.child:
        child(args.child, layers)
        return 0
    rounds = args.rounds or (1 if args.quick else 5)
    name = args.name or ("apply_quick" if args.quick else "apply")
    info = machine()

    # where trace() ends inside get_ia3_model: the rewrite is the rest of IA3Model.__init__
    real_trace = ia3fx_model.trace
    traced_at: list[Clock] = []

    def timed_trace(*a, **k):
        gm = real_trace(*a, **k)
        traced_at.append(Clock())
        return gm

    ia3fx_model.trace = timed_trace

    model, inputs = meta_llama(layers), example()
    # warm-up: a process's first export pays for imports and caches
    torch.export.export(meta_llama(1), (), inputs, dynamic_shapes=dynamic_shapes())

    def export_static():
        torch.export.export(model, (), inputs)

    def export_dynamic():
        return torch.export.export(model, (), inputs, dynamic_shapes=dynamic_shapes())

    def apply():
        return ia3fx.get_ia3_model(model, ia3fx.IA3Config(), example_inputs=inputs)

    def apply_static():
        return ia3fx.get_ia3_model(model, ia3fx.IA3Config(), example_inputs=inputs, dynamic=False)

    contenders = {
        "export_static": export_static,
        "export_dynamic": export_dynamic,
        "get_ia3_model": apply,
        "get_ia3_model_static": apply_static,
    }
    wall: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    extra: dict[str, list[float]] = {
        k: [] for k in ("rewrite_wall", "rewrite_cpu", "codegen_wall", "module_wall", "module_cpu")
    }
    nodes = 0
    for r in range(rounds):
        for key in contenders if r % 2 == 0 else list(contenders)[::-1]:
            gc.collect()  # the previous contender's graphs are cyclic garbage: not this one's cost
            start = Clock()
            out = contenders[key]()
            end = Clock()
            wall[key].append(end.wall - start.wall)
            cpu[key].append(end.cpu - start.cpu)
            if key.startswith("get_ia3_model"):  # the rewrite: from trace()'s return to get_ia3_model's
                extra["rewrite_wall"].append(end.wall - traced_at[-1].wall)
                extra["rewrite_cpu"].append(end.cpu - traced_at[-1].cpu)
                t = Clock()
                gm = realize(out.graph_module)
                extra["codegen_wall"].append(t.since()[0])
                nodes = len(gm.graph.nodes)
            elif key == "export_dynamic":
                t = Clock()
                out.module()  # what a user of the bare export calls to get a runnable module
                module_wall, module_cpu = t.since()
                extra["module_wall"].append(module_wall)
                extra["module_cpu"].append(module_cpu)
            del out
        print(f"  round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    ia3fx_model.trace = real_trace

    def per_round(times: dict[str, list[float]], num: str, den: str) -> dict:
        return ratio_of(times[num], times[den])

    def ratio_of(nums: list[float], dens: list[float]) -> dict:
        rs = [a / b for a, b in zip(nums, dens, strict=True)]
        return {"median": round(statistics.median(rs), 4), "rounds": [round(x, 4) for x in rs]}

    ratios = {
        "get_ia3_model / export_dynamic (wall)": per_round(wall, "get_ia3_model", "export_dynamic"),
        "get_ia3_model / export_dynamic (cpu)": per_round(cpu, "get_ia3_model", "export_dynamic"),
        "get_ia3_model / export_dynamic+module (cpu)": ratio_of(
            cpu["get_ia3_model"], [e + m for e, m in zip(cpu["export_dynamic"], extra["module_cpu"], strict=True)]
        ),
        "get_ia3_model_static / export_static (wall)": per_round(wall, "get_ia3_model_static", "export_static"),
        "get_ia3_model_static / export_static (cpu)": per_round(cpu, "get_ia3_model_static", "export_static"),
        "get_ia3_model / export_static (cpu)": per_round(cpu, "get_ia3_model", "export_static"),
        "export_dynamic / export_static (cpu)": per_round(cpu, "export_dynamic", "export_static"),
    }
    memory = {"apply": measure_child("apply", layers)}
    if not args.quick:
        memory["export_dynamic"] = measure_child("export", layers)
    med = {k: statistics.median(v) for k, v in {**wall, **extra}.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}

    title = (
        f"LlamaForCausalLM on meta, {layers} layers, hidden 4096, intermediate 11008, 32 heads, "
        f"vocab 32000; {nodes} graph nodes after the rewrite"
    )
    rows = [("step", "wall (s, median)", "cpu (s, median)")]
    for k in contenders:
        rows.append((k, f"{med[k]:.3f}", f"{med_cpu[k]:.3f}"))
    rows += [
        ("  of which rewrite", f"{med['rewrite_wall']:.4f}", f"{statistics.median(extra['rewrite_cpu']):.4f}"),
        ("ep.module() (in trace)", f"{med['module_wall']:.3f}", ""),
        ("codegen at first call", f"{med['codegen_wall']:.3f}", ""),
    ]
    print(title)
    print(table(rows))
    rewrite_ms = med["rewrite_wall"] * 1e3
    rewrite_cpu_ms = statistics.median(extra["rewrite_cpu"]) * 1e3
    print(f"rewrite: {rewrite_cpu_ms:.1f} ms cpu, {rewrite_ms:.1f} ms wall   target < 100 ms: "
          f"{'met' if rewrite_cpu_ms < 100 else 'MISSED'} (cpu), {'met' if rewrite_ms < 100 else 'MISSED'} (wall)")
    for k, v in ratios.items():
        like_for_like = k.split(" (")[0] in (
            "get_ia3_model / export_dynamic", "get_ia3_model / export_dynamic+module", "get_ia3_model_static / export_static"
        )
        target = " target <= 1.20: " + ("met" if v["median"] <= 1.2 else "MISSED") if like_for_like else ""
        print(f"{k:<48} median {v['median']:.3f}{target}")
    peak = memory["apply"]["peak_rss_mb"]
    bare = memory.get("export_dynamic", {}).get("peak_rss_mb")
    print(f"peak RSS, get_ia3_model process: {peak:.0f} MB (bare export process: "
          f"{'-' if bare is None else f'{bare:.0f}'} MB; after imports: "
          f"{memory['apply']['after_import_mb']:.0f} MB)   target < 1024 MB: {'met' if peak < 1024 else 'MISSED'}")

    path = write_json(
        name,
        {
            "figure": "apply time and memory on a meta-device 7B-shaped Llama",
            "command": command(),
            "model": title,
            "method": f"{rounds} rounds, order reversed each round; medians; ratios are medians of "
            "per-round ratios; gc.collect() before each timed call; peak RSS = VmHWM of a fresh subprocess",
            "targets": {"rewrite_ms": 100, "get_ia3_model / export_dynamic": 1.2,
                        "get_ia3_model_static / export_static": 1.2, "peak_rss_mb": 1024},
            "rewrite_ms": {"wall": round(rewrite_ms, 2), "cpu": round(rewrite_cpu_ms, 2),
                           "rounds_cpu": [round(x * 1e3, 2) for x in extra["rewrite_cpu"]],
                           "rounds_wall": [round(x * 1e3, 2) for x in extra["rewrite_wall"]]},
            "codegen_at_first_call_s": round(med["codegen_wall"], 4),
            "ep_module_s": round(med["module_wall"], 4),
            "ratios": ratios,
            "seconds_wall": {k: [round(t, 4) for t in v] for k, v in wall.items()},
            "seconds_cpu": {k: [round(t, 4) for t in v] for k, v in cpu.items()},
            "memory_mb": memory,
            "machine": info,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
