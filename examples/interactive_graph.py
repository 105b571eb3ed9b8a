"""Browse the adapted graph and see what training learned: the interactive page, the plot, Model Explorer files.

    python examples/interactive_graph.py [OUT_DIR]      # default: interactive-graph-out/

Adapts the built-in tiny Llama (random weights, no download) with PEFT's defaults, trains two
adapters a few steps each (one with a ten times larger learning rate, so they differ), and writes:

- ``graph.html``: one self-contained page (no network): the folded view, pan and zoom, search by
  module path, click the ``× 2`` block to draw it in full, hover a scale node for its layer,
  placement, vector size and the trained vector's mean, min, max and ``|v - 1|``;
- ``movement.png``: ``ia3fx.report(ia3).plot(...)``: per block and site kind, how far each adapter's
  vectors moved from ones, the two adapters side by side (needs matplotlib: ``ia3fx[plot]``);
- ``model-explorer/``: the Model Explorer graph JSON (adapted and base) and its overlays
  (``ia3fx.view(ia3, dir, base=True, browser=False)``; open them with ``ia3fx view``).

With chromium installed, ``--screenshots`` also writes ``interactive-graph.png`` (the page) and
``interactive-graph-expanded.png`` (after a click on the fold): the docs' pictures come from
``python examples/interactive_graph.py docs/images --screenshots``. Each claim is checked; the script
exits non-zero if one does not hold.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import torch

import ia3fx
from ia3fx.presets import build_preset
from ia3fx.view import write_model_explorer_files
from ia3fx.viz_plot import movement_table

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices


def train(ia3, adapter: str, lr: float, steps: int = 5) -> None:
    """A few steps of next-token training on counting sequences, for ``adapter`` only."""
    ia3.set_adapter(adapter)
    ia3.train()
    opt = torch.optim.AdamW([p for p in ia3.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = (torch.randint(0, 16, (4, 1), generator=g) + torch.arange(24)) % 16
        ia3(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ia3.eval()


def screenshot(chromium: str, url: str, path: str) -> None:
    """The page as headless Chromium paints it, in 64 colours when Pillow is there (small files for the docs)."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,700", f"--screenshot={path}", url],
                   capture_output=True, timeout=120, check=True)
    try:
        from PIL import Image
    except ImportError:
        return
    Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = args[0] if args else "interactive-graph-out"
    os.makedirs(out, exist_ok=True)
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        print(f"  {'ok ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    torch.manual_seed(0)
    ia3 = ia3fx.get_ia3_model(build_preset("tiny-llama"), ia3fx.IA3Config(), adapter_name="slow")
    ia3.add_adapter("fast", ia3fx.IA3Config())
    train(ia3, "slow", lr=0.005)
    train(ia3, "fast", lr=0.05)
    ia3.set_adapter("fast")

    page = os.path.join(out, "graph.html")
    ia3fx.draw(ia3, page)
    text = open(page, encoding="utf-8").read()
    print(f"1. interactive page: {page} ({len(text) // 1024} KiB)")
    check(not re.search(r"https?://", text), "the page holds no URL: it opens offline")
    data = json.loads(re.search(r'id="ia3fx-data">(.*?)</script>', text, re.S).group(1))
    scales = [i for i in data["views"][""]["items"].values() if i.get("role") == "scale"]
    check(len(scales) == 3 and all(len(i["folded"]) == 2 for i in scales),
          "3 scale nodes drawn, each standing for both layers of the fold")
    down = next(i for i in scales if i["layer"].endswith("down_proj"))
    vector = ia3.get_vector(down["layer"]).detach()
    check(abs(down["stats"]["mean_abs_dev"] - (vector - 1).abs().mean().item()) < 1e-5,
          f"hover data of {down['layer']}: mean |v-1| {down['stats']['mean_abs_dev']:.4f}, the trained vector's")

    report = ia3fx.report(ia3)
    table = movement_table(report)
    fast = sum(v for row in table.mean.values() for v in row["fast"] if v is not None)
    slow = sum(v for row in table.mean.values() for v in row["slow"] if v is not None)
    check(fast > 2 * slow > 0, f"the fast adapter moved further from ones (sum of mean |v-1|: {fast:.3f} vs {slow:.3f})")
    try:
        report.plot(os.path.join(out, "movement.png"))
        print(f"2. what training learned: {os.path.join(out, 'movement.png')} (adapters {', '.join(table.adapters)})")
    except ImportError as e:
        print(f"2. no plot: {e}")

    files = write_model_explorer_files(ia3, os.path.join(out, "model-explorer"), base=True)
    print(f"3. {files.how_to_open()}")
    overlay = json.load(open(files.overlays["abs-dev"], encoding="utf-8"))
    values = next(iter(overlay.values()))["results"]  # {graph id: {"results": ...}}
    check(len(values) == 6, "Model Explorer overlay: mean |v-1| on each of the 6 scale nodes")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if "--screenshots" in sys.argv and chromium:
        url = "file://" + os.path.abspath(page)
        screenshot(chromium, url, os.path.join(out, "interactive-graph.png"))
        screenshot(chromium, url + "#click=model.layers.0", os.path.join(out, "interactive-graph-expanded.png"))
        print(f"4. screenshots: {out}/interactive-graph.png, interactive-graph-expanded.png")
    if failures:
        print(f"FAILED: {len(failures)} claim(s) did not hold")
        return 1
    print("OK: page, plot and Model Explorer files written and checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
