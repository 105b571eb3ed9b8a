"""The interactive page of a 32-layer 7B-shaped Llama (meta device): written in seconds, first paint < 2 s.

Figures, each against a peer measured in the same run (contenders alternate, the order reversing
every round; the figure is the median of the per-round ratios):

1. **writing** ``graph.html`` (``ia3fx.draw(ia3, "graph.html")``: the folded drawing, the expanded
   drawing of each fold, the vectors' data) against writing the static ``graph.svg`` (the same
   folded layout, one Graphviz run), and writing the Model Explorer files (``ia3fx.view``, every
   node: about 2,400) against the same ``graph.svg``;
2. **opening** it in headless Chromium: the wall time of ``chromium --headless --screenshot`` for
   the page against the same for the static SVG (browser start-up included on both sides), and the
   page's own time to its first frame after the drawing (``performance.now()`` in two nested
   ``requestAnimationFrame`` callbacks, read back with ``--dump-dom``), which should be < 2 s.

Tracing and adapting the meta model is done once, before timing (about a minute on a busy 2-core
machine). ``python benchmarks/bench_viz.py`` (``--quick``: 4 layers, 3 rounds).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import llama_config, machine, write_json  # noqa: E402

import ia3fx  # noqa: E402
from ia3fx.view import write_model_explorer_files  # noqa: E402

SEVEN_B = dict(hidden=4096, intermediate=11008, heads=32, vocab=32000)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def adapted_meta_llama(layers: int):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers, **SEVEN_B)).eval()
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())
    ia3.graph_module  # noqa: B018  (the whole-model trace, done once, outside the timing)
    return ia3


def alternate(contenders: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict[str, float]:
    per_round = [a / b for a, b in zip(times[num], times[den])]
    q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {"ratio": f"{num} / {den}", "median": statistics.median(per_round), "q1": q[0], "q3": q[2]}


def chromium(*args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 layers, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="default 9 (3 with --quick)")
    args = p.parse_args(argv)
    layers, rounds = (4, 3) if args.quick else (32, 9)
    rounds = args.rounds or rounds
    t0 = time.perf_counter()
    ia3 = adapted_meta_llama(layers)
    setup = time.perf_counter() - t0
    print(f"meta Llama, {layers} layers, hidden 4096: traced and adapted in {setup:.1f} s "
          f"({len(ia3.graph_module.graph.nodes)} graph nodes)")
    out = tempfile.mkdtemp(prefix="bench-viz-")
    html, svg, me = (os.path.join(out, n) for n in ("graph.html", "graph.svg", "me"))
    write = alternate({
        "html": lambda: ia3fx.draw(ia3, html),
        "svg": lambda: ia3fx.draw(ia3, svg),
        "model explorer files": lambda: write_model_explorer_files(ia3, me),
    }, rounds)
    results: dict[str, object] = {
        "layers": layers, "rounds": rounds, "setup_s": setup, "write_s": write,
        "write_ratios": [ratio(write, "html", "svg"), ratio(write, "model explorer files", "svg")],
        "html_bytes": os.path.getsize(html),
    }
    for name, t in write.items():
        print(f"write {name}: median {statistics.median(t):.3f} s")
    for r in results["write_ratios"]:
        print(f"  {r['ratio']}: {r['median']:.2f} (q1 {r['q1']:.2f}, q3 {r['q3']:.2f})")
    if CHROMIUM is None:
        print("chromium is not installed: the opening figures are left out (.ci/setup installs it)")
    else:
        shot = os.path.join(out, "shot.png")
        opening = alternate({
            "open html": lambda: chromium(f"--screenshot={shot}", "file://" + html),
            "open svg": lambda: chromium(f"--screenshot={shot}", "file://" + svg),
        }, rounds)
        frames = []
        for _ in range(rounds):
            dom = chromium("--virtual-time-budget=5000", "--dump-dom", "file://" + html)
            m = re.search(r'data-first-frame-ms="([\d.]+)"', dom)
            if m:
                frames.append(float(m.group(1)) / 1000)
        results.update(open_s=opening, open_ratio=ratio(opening, "open html", "open svg"), first_frame_s=frames)
        r = results["open_ratio"]
        print(f"open in headless Chromium: html {statistics.median(opening['open html']):.2f} s, "
              f"svg {statistics.median(opening['open svg']):.2f} s; {r['ratio']}: {r['median']:.2f} "
              f"(q1 {r['q1']:.2f}, q3 {r['q3']:.2f})")
        if frames:
            print(f"page's first frame after the drawing: median {statistics.median(frames):.3f} s "
                  f"(max {max(frames):.3f} s) from navigation start")
    results["machine"] = machine()
    print("wrote", write_json("bench_viz_quick" if args.quick else "bench_viz", results))
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
