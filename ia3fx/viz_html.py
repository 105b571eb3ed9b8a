"""The interactive page: ``ia3fx.draw(model, "graph.html")``.

One self-contained HTML file (no network: its script and style are inlined from
``ia3fx/viz_assets/``), showing the folded view of :mod:`ia3fx.viz` laid out by Graphviz as SVG,
with pan and zoom, a search by module path, a click on a folded ``× N`` block to draw that block in
full (and back), the legend, and, on hover over a scale or vector node, its layer, placement, vector
size and the vector's statistics (:func:`ia3fx.viz_stats.vector_stats`; for a folded block, the
range over every layer it stands for).

The expanded drawings are laid out here, when the file is written (one per folded run, at most
:data:`MAX_EXPANDED`), so the page needs no layout engine and opens fast: the page of a 32-layer
7B-shaped Llama holds two small drawings.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import graphviz

from .viz import COLORS, _dot_and_layout, _Layout, _model_name, _write_file
from .viz_stats import graph_vectors, vector_stats

__all__ = ["write_html", "page_html", "MAX_EXPANDED"]

MAX_EXPANDED = 12  # folded runs given an expanded drawing; the page says so for the others
_NODE_TITLE = re.compile(r'<g id="node\d+" class="node">\s*<title>(.*?)</title>', re.S)
_PROLOG = re.compile(r"^.*?(?=<svg\b)", re.S)
_NAMESPACES = re.compile(r'\s+xmlns(?::xlink)?="[^"]*"')
_COMMENTS = re.compile(r"<!--.*?-->", re.S)


def _svg(g: graphviz.Digraph) -> str:
    """Graphviz's SVG, ready to inline in HTML: no XML prolog, DOCTYPE, comments or namespace URLs."""
    try:
        text = g.pipe(format="svg").decode("utf-8")
    except graphviz.ExecutableNotFound as e:
        raise RuntimeError(
            "writing .html needs Graphviz's `dot` program (it lays out the drawing), which is not on PATH; "
            "install Graphviz (e.g. apt-get install graphviz) or write a .dot file"
        ) from e
    text = _COMMENTS.sub("", _PROLOG.sub("", text, count=1))
    return _NAMESPACES.sub("", text)


def _drawn_ids(svg: str) -> list[str]:
    return [html.unescape(t) for t in _NODE_TITLE.findall(svg)]


def _fmt_stats(stats: dict[str, float] | None) -> dict[str, float] | None:
    return None if stats is None else {k: round(v, 6) for k, v in stats.items()}


def _items(layout: _Layout, ids: Sequence[str], stats: dict[tuple[str, str], Any]) -> dict[str, dict]:
    """What the page shows for each drawn node: its module, and for ia3fx's nodes the vector's numbers."""
    members: dict[str, list[str]] = {}
    for member, rep in layout.rep_of.items():
        members.setdefault(rep, []).append(member)
    out: dict[str, dict] = {}
    for node_id in ids:
        r = layout.by_id.get(node_id.removeprefix("ops__"))
        if r is None:
            continue
        item: dict[str, Any] = {"module": r.module, "path": layout.display_path(r.module)}
        if r.role in ("scale", "vector") and r.layer:
            layers = [r] + [layout.by_id[m] for m in members.get(r.id, ()) if m in layout.by_id]
            per_layer = {x.layer: _fmt_stats(stats.get((x.layer, x.scale))) for x in layers if x.layer}
            item.update(role=r.role, layer=r.layer, scale=r.scale, size=r.size, stats=per_layer[r.layer])
            if len(per_layer) > 1:
                item["folded"] = per_layer
        elif r.site is not None:
            item.update(role="call_site", layer=r.site.name, kind=r.site.kind, scales=list(r.site_scales),
                        features=[r.site.in_features, r.site.out_features])
        out[node_id] = item
    return out


def _view_data(layout: _Layout, svg: str, stats: dict) -> dict[str, Any]:
    return {"items": _items(layout, _drawn_ids(svg), stats), "runs": _runs(layout)}


def _runs(layout: _Layout) -> list[dict[str, Any]]:
    return [
        {"path": run.rep, "parent": run.parent, "lo": run.indices[0], "hi": run.indices[-1], "size": run.size,
         "label": run.label_path()}
        for run in layout.runs
    ]


def _asset(name: str) -> str:
    return resources.files("ia3fx").joinpath("viz_assets", name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script>`` element (no ``</script>`` can end it early)."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/").replace("<!--", "<\\!--")


def page_html(
    model_or_graph: Any,
    *,
    view: str = "folded",
    expand: str | Sequence[str] | None = None,
    base: Any = None,
) -> tuple[str, graphviz.Digraph]:
    """The page's HTML text and the ``graphviz.Digraph`` of its first drawing."""
    g, layout, gm = _dot_and_layout(model_or_graph, view=view, expand=expand, base=base, legend=False)
    fixed = [expand] if isinstance(expand, str) else list(expand or ())
    stats = {key: vector_stats(t) for key, t in graph_vectors(gm).items()}
    first = _svg(g)
    views: dict[str, Any] = {"": _view_data(layout, first, stats)}
    expanded: dict[str, str] = {}
    for run in layout.runs[:MAX_EXPANDED]:
        eg, elayout, _ = _dot_and_layout(model_or_graph, view=view, expand=fixed + [run.rep], base=base,
                                         legend=False)
        expanded[run.rep] = _svg(eg)
        views[run.rep] = _view_data(elayout, expanded[run.rep], stats)
    data = {
        "title": g.graph_attr.get("label", "").replace("\\n", " · "),
        "runs": _runs(layout),
        "views": views,
        "colors": COLORS,
        "maxExpanded": MAX_EXPANDED,
    }
    name = html.escape(_model_name(model_or_graph, gm))
    page = (
        _asset("graph.html")
        .replace("__IA3FX_TITLE__", name)
        .replace("__IA3FX_CSS__", _asset("graph.css"))
        .replace("__IA3FX_SVG__", first)
        .replace("__IA3FX_DATA__", _script_json(data))
        .replace("__IA3FX_EXPANDED__", _script_json(expanded))
        .replace("__IA3FX_JS__", _asset("graph.js"))
    )
    return page, g


def write_html(
    model_or_graph: Any,
    path: str | os.PathLike,
    *,
    view: str = "folded",
    expand: str | Sequence[str] | None = None,
    base: Any = None,
) -> graphviz.Digraph:
    """Write the interactive page to ``path`` (atomically) and return the first drawing's ``Digraph``."""
    page, g = page_html(model_or_graph, view=view, expand=expand, base=base)
    _write_file(os.fspath(path), page.encode("utf-8"))
    return g
