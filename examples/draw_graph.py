"""See the adapted graph: draw it, diff it against the base, query it with networkx, report on it.

    python examples/draw_graph.py [OUT_DIR]      # default: draw-graph-out/

Adapts the built-in tiny Llama (2 layers, random weights, no download) with PEFT's defaults for
llama (``k_proj``/``v_proj`` output-scaled, ``down_proj`` input-scaled) and writes:

- ``tiny-llama-folded.svg``/``.png``: module clusters, the two identical layers drawn once as
  ``× 2``, scale nodes orange (attention-type) or blue (feedforward), a legend;
- ``tiny-llama-diff.svg``: the nodes the rewrite added, in green;
- ``tiny-llama-merged-diff.svg``: ``merged_graph_module()`` against the adapted graph: every ia3fx
  node removed (red, dashed), none left;
- ``tiny-llama-expanded.dot``: the folded view with ``model.layers.1`` drawn node by node.

Without Graphviz's ``dot`` program only the ``.dot`` sources are written. The docs' pictures in
``docs/images/`` come from ``python examples/draw_graph.py docs/images``. Each claim is checked;
the script exits non-zero if one does not hold.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings

import networkx as nx

import ia3fx
from ia3fx.presets import build_preset
from ia3fx.viz import graph_diff

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notices


def main() -> int:
    out = sys.argv[1] if len(sys.argv) > 1 else "draw-graph-out"
    os.makedirs(out, exist_ok=True)
    render = shutil.which("dot") is not None
    ext = ".svg" if render else ".dot"
    failures: list[str] = []

    def check(cond: bool, what: str) -> None:
        print(f"  {'ok ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)

    model = build_preset("tiny-llama")
    ia3 = ia3fx.get_ia3_model(model, ia3fx.IA3Config())

    # 1. the folded view (the default); a PNG too for places that cannot show SVG
    t0 = time.perf_counter()
    g = ia3fx.draw(ia3, os.path.join(out, f"tiny-llama-folded{ext}"))
    print(f"folded view in {time.perf_counter() - t0:.2f} s: {g.graph_attr['label']!r}")
    if render:
        png = g.copy()
        png.graph_attr["dpi"] = "60"  # small enough for the docs
        with open(os.path.join(out, "tiny-llama-folded.png"), "wb") as f:
            f.write(png.pipe(format="png"))
    check("model.layers.[0-1]  × 2" in g.source, "the two identical layers are folded into one cluster, × 2")

    # 2. what the rewrite added, and (after merging) that nothing of it remains
    diff = graph_diff(ia3)
    print(f"diff: {diff.summary()}: {', '.join(diff.added)}")
    ia3fx.draw(ia3, os.path.join(out, f"tiny-llama-diff{ext}"), view="diff")
    check(len(diff.added) == 12, "12 nodes added: 2 layers x 3 sites x (vector get_attr, mul)")
    merged = ia3.merged_graph_module()
    gone = graph_diff(merged, base=ia3)
    ia3fx.draw(merged, os.path.join(out, f"tiny-llama-merged-diff{ext}"), view="diff", base=ia3)
    check(gone.added == [] and sorted(gone.removed) == sorted(diff.added),
          "the merged graph has none of them: all removed, nothing added")

    # 3. one block in full, inside the folded view
    g = ia3fx.draw(ia3, os.path.join(out, "tiny-llama-expanded.dot"), expand="model.layers.1")
    check('"cluster_model.layers.1"' in g.source and "× 2" not in g.source,
          "expand='model.layers.1' draws layer 1 node by node, unfolded")

    # 4. the graph as a networkx DiGraph: which vector feeds each scale node
    nxg = ia3fx.to_networkx(ia3)
    for name, attrs in nxg.nodes(data=True):
        if attrs["role"] == "scale" and attrs["layer"].startswith("model.layers.0."):
            vec = [a for a in nx.ancestors(nxg, name) if nxg.nodes[a]["role"] == "vector"
                   and nxg.nodes[a]["layer"] == attrs["layer"]]
            print(f"  {name}: scales the {attrs['scale']} of {attrs['layer']} by {nxg.nodes[vec[0]]['target']}")
            check(len(vec) == 1, f"one vector reaches {name}")

    # 5. the report: found, matched, skipped (and why), sizes per block, tied weights
    print()
    print(ia3fx.report(ia3).text())
    print(f"\nwrote {', '.join(sorted(os.listdir(out)))} to {out}/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
