"""Draw an adapted graph: ``ia3fx.draw(model, "graph.svg")``.

Three views of one ``GraphModule`` (or an ``IA3Model``'s :attr:`~ia3fx.IA3Model.graph_module`):

``folded`` (default)
    Nodes are grouped by module hierarchy, one cluster per block. Identical repeated blocks
    (``model.layers.0`` … ``model.layers.31`` with the same structure) are drawn once, labelled
    ``× 32``; inside a module, runs of plain operations are collapsed into one box ("12 ops"),
    while call sites, ia3fx's nodes, inputs and outputs stay visible. ``expand="model.layers.3"``
    takes that module out of its fold and draws every node in it.
``full``
    Every node, clustered by module; nothing folded or collapsed (large for big models).
``diff``
    The folded layout, marking what the rewrite changed against ``base`` (a graph before the
    rewrite, e.g. ``ia3fx.trace(model)``; by default the adapted graph minus ia3fx's tagged
    nodes): added nodes green, removed ones red and dashed, re-pointed ones amber. For
    ``model.merged_graph_module()`` it shows that no ia3fx node remains.

Scale nodes are filled by role: attention-type sites (output scaled) orange, feedforward sites
(input scaled) blue; call sites are labelled with their module path, shape and vector size. The
path's suffix picks the output: ``.dot``/``.gv`` writes the DOT source (no Graphviz binary
needed); ``.svg``, ``.png``, ``.pdf`` run Graphviz's ``dot``.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import graphviz
import networkx as nx
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .analysis import IA3_KEY, graph_of, module_classes, node_module, target_name, value_info
from .atomic_files import temp_path
from .sites import CallSite, find_call_sites

__all__ = ["draw", "to_dot", "graph_diff", "GraphDiff", "COLORS", "VIEWS"]

VIEWS = ("folded", "full", "diff")
_BITMAP = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg"}
_SOURCE = (".dot", ".gv")

COLORS = {
    "output": "#e8743b",  # attention-type site: output scaled
    "output_vector": "#fbd7c3",
    "input": "#3b7ddd",  # feedforward site: input scaled
    "input_vector": "#cfe0f8",
    "call_site": "#eeeeee",
    "io": "#e3f1e3",
    "param": "#f7f7f7",
    "saved": "#9467bd",  # modules_to_save: reads re-pointed at a trained copy
    "ops": "#777777",
    "fold": "#fff6d9",
    "added": "#2e9d3a",
    "removed": "#d62728",
    "changed": "#c58a00",
    "faded": "#9a9a9a",
    "edge": "#606060",
}
_FONT = "Helvetica"


# --- an intermediate form: one record per node, from one graph or from two (diff) --------------
@dataclass
class _N:
    id: str  # DOT node id (the FX node name; "base__<name>" for a node only the base has)
    name: str
    op: str
    target: str
    opname: str  # short: "linear", "mul", the get_attr path
    module: str
    role: str | None = None  # vector | scale | cast (ia3fx's nodes)
    layer: str | None = None
    scale: str | None = None  # input | output
    site: CallSite | None = None
    site_scales: tuple[str, ...] = ()  # placements scaled at this call site
    shape: Any = None
    inputs: list[str] = field(default_factory=list)
    users: int = 0
    status: str = "same"  # same | added | removed | changed
    consts: str = ""  # the non-node arguments, for structural comparison
    size: int | None = None  # vector size, for ia3fx's nodes
    saved: bool = False  # a read of a modules_to_save copy


def _opname(node: Node) -> str:
    if node.op in ("call_function", "call_method"):
        t = node.target
        name = getattr(t, "_opname", None) or getattr(t, "__name__", None) or str(t)
        return name.removesuffix(".default")
    return str(node.target)


def _records(gm: GraphModule) -> list[_N]:
    sites = {s.node: s for s in find_call_sites(gm)}
    placements: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        info = node.meta.get(IA3_KEY) or {}
        if info.get("role") == "scale":
            placements.setdefault(info.get("site"), set()).add(info.get("scale"))
    out = []
    for node in gm.graph.nodes:
        info = node.meta.get(IA3_KEY) or {}
        shape, _ = value_info(node)
        consts = ""
        if node.op in ("call_function", "call_method"):
            consts = repr(map_arg((node.args, node.kwargs), lambda _: None))
        target = target_name(node)
        site_of = sites.get(info.get("site")) if info else None
        size = None
        if site_of is not None:
            size = site_of.in_features if info.get("scale") == "input" else site_of.out_features
        out.append(
            _N(
                id=node.name,
                name=node.name,
                op=node.op,
                target=target,
                opname=_opname(node),
                module=node_module(node),
                role=info.get("role"),
                layer=info.get("layer"),
                scale=info.get("scale"),
                site=sites.get(node.name),
                site_scales=tuple(sorted(placements.get(node.name, ()))),
                shape=shape,
                inputs=[i.name for i in node.all_input_nodes],
                users=len(node.users),
                consts=consts,
                saved=node.op == "get_attr" and target.startswith("modules_to_save."),
                size=size,
            )
        )
    return out


@dataclass
class GraphDiff:
    """Node names the rewrite added, removed, or re-pointed (same node, other attribute)."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    common: list[str]

    def summary(self) -> str:
        return f"+{len(self.added)} added, -{len(self.removed)} removed, ~{len(self.changed)} re-pointed"


def _untagged(records: list[_N]) -> set[str]:
    return {r.name for r in records if r.role is None}


def _diff_records(adapted: list[_N], base: list[_N] | None) -> tuple[list[_N], GraphDiff]:
    """Mark ``adapted`` against ``base`` (default: ``adapted`` without ia3fx's tagged nodes)."""
    if base is None:
        for r in adapted:
            r.status = "added" if r.role else "same"
        diff = GraphDiff(
            [r.name for r in adapted if r.role], [], [], [r.name for r in adapted if not r.role]
        )
        return adapted, diff
    by_name = {r.name: r for r in base}
    added, removed, changed, common = [], [], [], []
    for r in adapted:
        b = by_name.get(r.name)
        if b is None or b.op != r.op:
            r.status = "added"
            added.append(r.name)
        elif b.target != r.target:
            r.status = "changed"
            changed.append(r.name)
        else:
            common.append(r.name)
    matched = {r.name for r in adapted if r.status != "added"}
    extra = []
    for b in base:
        if b.name in matched:
            continue
        b.status = "removed"
        removed.append(b.name)
        b.id = f"base__{b.name}"
        extra.append(b)
    ids = {b.name: b.id for b in extra}
    for b in extra:
        b.inputs = [ids.get(i, i) for i in b.inputs]
    return adapted + extra, GraphDiff(added, removed, changed, common)


def graph_diff(adapted: Any, base: Any = None) -> GraphDiff:
    """What the rewrite changed: node names in ``adapted`` and not in ``base`` and the reverse.

    Without ``base``, the nodes ia3fx tagged (``node.meta["ia3fx"]``) count as added.
    """
    _, diff = _diff_records(_records(graph_of(adapted, "graph_diff()")), _records(graph_of(base, "graph_diff()")) if base is not None else None)
    return diff


# --- folding identical repeated blocks -----------------------------------------------------------
def _prefixes(path: str) -> Iterable[str]:
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


@dataclass
class _Run:
    parent: str
    indices: list[int]

    @property
    def rep(self) -> str:
        return f"{self.parent}.{self.indices[0]}"

    @property
    def size(self) -> int:
        return len(self.indices)

    def label_path(self) -> str:
        return f"{self.parent}.[{self.indices[0]}-{self.indices[-1]}]"


def _signature(member: str, nodes: list[_N]) -> tuple:
    local = {n.id: i for i, n in enumerate(nodes)}
    cut = len(member)
    sig = []
    for n in nodes:
        target = n.target.replace(member + ".", "@.") if member in n.target else n.target
        sig.append(
            (
                n.module[cut:],
                n.op,
                target,
                n.role,
                n.scale,
                n.site_scales,
                n.status,
                n.consts,
                tuple(local.get(i, -1) for i in n.inputs),
            )
        )
    return tuple(sig)


def _find_runs(records: list[_N], pinned: Sequence[str]) -> tuple[list[_Run], dict[str, str], dict[str, tuple]]:
    """Runs of consecutive identical numbered siblings; node id -> representative id; node -> runs."""
    members: dict[str, list[_N]] = {}
    for r in records:
        for p in _prefixes(r.module) if r.module else ():
            if p.rpartition(".")[2].isdigit():
                members.setdefault(p, []).append(r)
    groups: dict[str, list[int]] = {}
    for m in members:
        parent, _, idx = m.rpartition(".")
        groups.setdefault(parent, []).append(int(idx))
    runs: list[_Run] = []
    for parent in sorted(groups, key=lambda p: p.count(".")):
        indices = sorted(groups[parent])
        current: list[int] = []
        current_sig = None
        for i in indices + [None]:
            path = f"{parent}.{i}" if i is not None else None
            free = path is not None and not any(_under(path, e) or _under(e, path) for e in pinned)
            sig = _signature(path, members[path]) if free else None
            if free and current and i == current[-1] + 1 and sig == current_sig:
                current.append(i)
                continue
            if len(current) > 1:
                runs.append(_Run(parent, current))
            current, current_sig = ([i], sig) if free else ([], None)
    rep_of: dict[str, str] = {}
    runs_of: dict[str, tuple] = {}
    for k, run in enumerate(runs):
        rep_nodes = members[run.rep]
        for j, idx in enumerate(run.indices):
            for pos, r in enumerate(members[f"{run.parent}.{idx}"]):
                runs_of[r.id] = runs_of.get(r.id, ()) + ((k, j),)
                if j:
                    rep_of.setdefault(r.id, rep_nodes[pos].id)
    return runs, rep_of, runs_of


def _resolve(rep_of: dict[str, str], node_id: str) -> str:
    seen = 0
    while node_id in rep_of and seen < 64:
        node_id = rep_of[node_id]
        seen += 1
    return node_id


# --- what to show --------------------------------------------------------------------------------
@dataclass
class _Item:
    id: str
    module: str
    attrs: dict[str, str]


def _interesting(r: _N, diff: bool) -> bool:
    return (
        r.op in ("placeholder", "output")
        or r.role is not None
        or r.site is not None
        or r.saved
        or (diff and r.status != "same")
    )


def _fmt_shape(shape: Any) -> str:
    if not shape or not isinstance(shape, tuple) or any(isinstance(d, tuple) for d in shape):
        return ""
    return "[" + ", ".join(str(d) for d in shape) + "]"


class _Layout:
    """Decides, for one view, which nodes are drawn, what they merge into, and their clusters."""

    def __init__(
        self,
        records: list[_N],
        classes: dict[str, str],
        view: str,
        expand: Sequence[str],
        diff: GraphDiff | None,
    ) -> None:
        self.records = records
        self.by_id = {r.id: r for r in records}
        self.classes = classes
        self.view = view
        self.expand = list(expand)
        self.diff = diff
        self.fold = view != "full"
        if self.fold:
            self.runs, self.rep_of, self.runs_of = _find_runs(records, self.expand)
        else:
            self.runs, self.rep_of, self.runs_of = [], {}, {}
        self.rep_paths = {run.rep: run for run in self.runs}

    def _open(self, module: str) -> bool:
        return not self.fold or any(_under(module, e) for e in self.expand)

    def display_path(self, path: str) -> str:
        """``model.layers.[0-31].mlp`` for a path inside a folded representative."""
        for rep, run in self.rep_paths.items():
            if _under(path, rep):
                return run.label_path() + path[len(rep):]
        return path

    def build(self) -> tuple[list[_Item], list[tuple[str, str, dict]]]:
        diff_view = self.diff is not None
        # plain nodes whose results reach nothing drawn (asserts, unused sizes) and weight reads
        # (their call sites say enough) are left out, unless their module is expanded
        users: dict[str, list[str]] = {}
        for r in self.records:
            for i in r.inputs:
                users.setdefault(i, []).append(r.id)
        shown: set[str] = set()
        for r in reversed(self.records):
            keep = self._open(r.module) or _interesting(r, diff_view)
            if not keep and r.op != "get_attr":
                keep = any(u in shown for u in users.get(r.id, ()))
            if keep:
                shown.add(r.id)
        visible: dict[str, _N] = {}
        for r in self.records:
            if r.id in shown and r.id not in self.rep_of:  # folded members are drawn as their representative
                visible[r.id] = r
        # collapse runs of plain ops within one module into boxes
        parent = {i: i for i in visible}

        def find(i: str) -> str:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def plain(r: _N) -> bool:
            return not self._open(r.module) and not _interesting(r, diff_view)

        for r in visible.values():
            if not plain(r):
                continue
            for i in r.inputs:
                s = visible.get(_resolve(self.rep_of, i))
                if s is not None and plain(s) and s.module == r.module and not self._crosses(i, r.id):
                    a, b = find(s.id), find(r.id)
                    if a != b:
                        parent[a] = b
        groups: dict[str, list[_N]] = {}
        for i, r in visible.items():
            groups.setdefault(find(i), []).append(r)
        box_of: dict[str, str] = {}
        boxes: dict[str, list[_N]] = {}
        for members in groups.values():
            if len(members) > 1:
                bid = f"ops__{members[0].id}"
                boxes[bid] = members
                for m in members:
                    box_of[m.id] = bid
        edges = self._edges(visible, box_of)
        # a box that makes a cycle (a path leaves it and comes back) is drawn as its nodes
        for _ in range(8):
            cyclic = self._cyclic_boxes(edges, boxes)
            if not cyclic:
                break
            for bid in cyclic:
                for m in boxes.pop(bid):
                    box_of.pop(m.id, None)
            edges = self._edges(visible, box_of)
        items = [self._box_item(bid, members) for bid, members in boxes.items()]
        items += [self._node_item(r) for r in visible.values() if r.id not in box_of]
        order = {r.id: k for k, r in enumerate(self.records)}
        items.sort(key=lambda it: order.get(it.id.removeprefix("ops__"), 0))
        return items, edges

    def _crosses(self, u: str, v: str) -> bool:
        """An edge from one member of a folded run into another (layer i -> layer i+1)."""
        ru, rv = self.runs_of.get(u, ()), self.runs_of.get(v, ())
        if not ru or not rv:
            return False
        mu = dict(ru)
        return any(k in mu and mu[k] != j for k, j in rv)

    def _edges(self, visible: dict[str, _N], box_of: dict[str, str]) -> list[tuple[str, str, dict]]:
        seen: dict[tuple[str, str], dict] = {}
        for r in self.records:
            v = _resolve(self.rep_of, r.id)
            if v not in visible:
                continue
            dv = box_of.get(v, v)
            for i in r.inputs:
                u = _resolve(self.rep_of, i)
                if u not in visible or self._crosses(i, r.id):
                    continue
                du = box_of.get(u, u)
                if du == dv or (du, dv) in seen:
                    continue
                seen[(du, dv)] = self._edge_attrs(visible[u], visible[v])
        return [(u, v, a) for (u, v), a in seen.items()]

    @staticmethod
    def _cyclic_boxes(edges: list[tuple[str, str, dict]], boxes: dict[str, list[_N]]) -> set[str]:
        g = nx.DiGraph()
        g.add_edges_from((u, v) for u, v, _ in edges)
        out: set[str] = set()
        for comp in nx.strongly_connected_components(g):
            if len(comp) > 1:
                out.update(c for c in comp if c in boxes)
        return out

    # --- attributes ---
    def _edge_attrs(self, u: _N, v: _N) -> dict:
        for r in (u, v):
            if r.role == "scale" or (r.role == "vector" and r is u):
                return {"color": COLORS[r.scale], "penwidth": "1.6"}
        return {}

    def _box_item(self, bid: str, members: list[_N]) -> _Item:
        counts: dict[str, int] = {}
        for m in members:
            counts[m.opname] = counts.get(m.opname, 0) + 1
        top = sorted(counts, key=lambda k: -counts[k])[:4]
        kinds = ", ".join(top) + (", …" if len(counts) > 4 else "")
        module = members[0].module
        short = module.rpartition(".")[2] or "(root)"
        label = f"{short}: {len(members)} ops\\n{kinds}"
        attrs = {
            "label": label,
            "shape": "box",
            "style": "rounded,dashed",
            "color": COLORS["ops"],
            "fontcolor": "#444444",
            "tooltip": f"{module}: " + ", ".join(m.name for m in members[:40]),
        }
        return _Item(bid, module, attrs)

    def _node_item(self, r: _N) -> _Item:
        attrs: dict[str, str] = {"tooltip": f"{r.name}: {r.target}" + (f" ({r.module})" if r.module else "")}
        shape = _fmt_shape(r.shape)
        if r.role == "scale":
            kind = "attention-type: output" if r.scale == "output" else "feedforward: input"
            attrs.update(
                label=f"× ia3 ({kind})\\n{r.name}",
                shape="box",
                style="rounded,filled,bold",
                fillcolor=COLORS[r.scale],
                color=COLORS[r.scale],
                fontcolor="white",
            )
        elif r.role == "vector":
            size = r.size if r.size is not None else (r.shape[0] if r.shape else "?")
            attrs.update(
                label=f"ia3_l {r.scale}\\nvector ({size})",
                shape="cylinder",
                style="filled",
                fillcolor=COLORS[f"{r.scale}_vector"],
                color=COLORS[r.scale],
            )
        elif r.role == "cast":
            attrs.update(label=f"type_as\\n{r.name}", shape="box", style="rounded", color=COLORS[r.scale])
        elif r.site is not None:
            s = r.site
            path = self.display_path(s.name)
            lines = [path, f"{s.kind} {s.in_features}→{s.out_features}"]
            if r.site_scales:
                sizes = ", ".join(
                    f"{p} ({s.in_features if p == 'input' else s.out_features})" for p in r.site_scales
                )
                lines.append(f"IA3 vector: {sizes}")
                color = COLORS[r.site_scales[0]]
                attrs.update(color=color, penwidth="2.5")
            else:
                attrs.update(color="#888888")
            attrs.update(label="\\n".join(lines), shape="box", style="filled", fillcolor=COLORS["call_site"])
        elif r.op in ("placeholder", "output"):
            attrs.update(label=f"{r.name}\\n{shape}" if shape else r.name, shape="oval", style="filled",
                         fillcolor=COLORS["io"])
        elif r.op == "get_attr":
            label = self.display_path(r.target)
            attrs.update(label=f"{label}\\n{shape}" if shape else label, shape="cylinder", style="filled",
                         fillcolor=COLORS["param"])
            if r.saved:
                attrs.update(color=COLORS["saved"], penwidth="2", fontcolor=COLORS["saved"],
                             label=f"modules_to_save copy\\n{label.removeprefix('modules_to_save.')}")
        else:
            attrs.update(label=f"{r.opname}\\n{r.name}" if r.opname != r.name else r.name, shape="box",
                         style="rounded")
        self._mark_status(r, attrs)
        return _Item(r.id, r.module, attrs)

    def _mark_status(self, r: _N, attrs: dict[str, str]) -> None:
        if self.diff is None:
            return
        if r.status == "same":
            attrs.update(fontcolor=COLORS["faded"], color="#bbbbbb")
            return
        color = COLORS[r.status]
        sign = {"added": "+ ", "removed": "− ", "changed": "~ "}[r.status]
        attrs["label"] = f"{sign}{r.status}: " + attrs.get("label", r.name)
        attrs.update(color=color, penwidth="3")
        if r.status == "removed":
            attrs["style"] = ",".join(filter(None, [attrs.get("style", ""), "dashed"]))


# --- clusters --------------------------------------------------------------------------------------
class _Tree:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[_Item] = []
        self.children: dict[str, _Tree] = {}

    def size(self) -> int:
        return len(self.items) + sum(c.size() for c in self.children.values())


def _cluster_tree(items: list[_Item]) -> _Tree:
    root = _Tree("")
    for it in items:
        node = root
        for p in _prefixes(it.module) if it.module else ():
            node = node.children.setdefault(p, _Tree(p))
        node.items.append(it)
    return root


def _emit(g: graphviz.Digraph, tree: _Tree, layout: _Layout, drawn_parent: str) -> None:
    for it in tree.items:
        g.node(it.id, **it.attrs)
    for child in tree.children.values():
        run = layout.rep_paths.get(child.path)
        total = child.size()
        # a cluster for a fold representative, or a module holding 2+ things that is not a mere wrapper
        wrapper = not child.items and len(child.children) == 1 and run is None
        if run is None and (total < 2 or wrapper):
            _emit(g, child, layout, drawn_parent)
            continue
        cls = layout.classes.get(child.path, "").rpartition(".")[2]
        rel = child.path[len(drawn_parent) + 1:] if drawn_parent else child.path
        if run is not None:
            label = f"{layout.display_path(child.path)}  × {run.size}"
            attrs = {"style": "rounded,filled,bold", "fillcolor": COLORS["fold"], "color": "#c9a227",
                     "penwidth": "2"}
        else:
            label = layout.display_path(child.path) if not drawn_parent else rel
            attrs = {"style": "rounded", "color": "#b0b0b0"}
        if cls:
            label += f"\\n({cls})"
        with g.subgraph(name=f"cluster_{child.path}") as c:
            c.attr(label=label, labeljust="l", fontname=_FONT, fontsize="11", **attrs)
            _emit(c, child, layout, child.path)


def _legend(g: graphviz.Digraph, diff: bool) -> None:
    entries = [
        ("legend_out", "× ia3 scale\\nattention-type: output",
         {"style": "rounded,filled,bold", "fillcolor": COLORS["output"], "color": COLORS["output"], "fontcolor": "white"}),
        ("legend_in", "× ia3 scale\\nfeedforward: input",
         {"style": "rounded,filled,bold", "fillcolor": COLORS["input"], "color": COLORS["input"], "fontcolor": "white"}),
        ("legend_vec", "ia3_l vector\\n(get_attr)", {"shape": "cylinder", "style": "filled",
                                                    "fillcolor": COLORS["output_vector"], "color": COLORS["output"]}),
        ("legend_site", "call site (scaled)\\nmodule path, in→out", {"style": "filled", "fillcolor": COLORS["call_site"],
                                                                    "color": COLORS["output"], "penwidth": "2.5"}),
        ("legend_plain", "call site\\n(not adapted)", {"style": "filled", "fillcolor": COLORS["call_site"], "color": "#888888"}),
        ("legend_ops", "module: N ops\\n(collapsed)", {"style": "rounded,dashed", "color": COLORS["ops"]}),
        ("legend_fold", "block  × N\\n(identical repeats)", {"style": "rounded,filled", "fillcolor": COLORS["fold"],
                                                              "color": "#c9a227"}),
    ]
    if diff:
        entries += [
            ("legend_added", "+ added by the rewrite", {"color": COLORS["added"], "penwidth": "3"}),
            ("legend_removed", "− removed", {"color": COLORS["removed"], "penwidth": "3", "style": "dashed"}),
            ("legend_changed", "~ re-pointed", {"color": COLORS["changed"], "penwidth": "3"}),
        ]
    with g.subgraph(name="cluster_legend") as c:
        c.attr(label="legend", style="rounded", color="#b0b0b0", fontname=_FONT, fontsize="11", rank="same")
        for nid, label, attrs in entries:
            c.node(nid, label=label, shape=attrs.pop("shape", "box"), fontsize="9", **attrs)
        for (a, _, _), (b, _, _) in zip(entries, entries[1:], strict=False):
            c.edge(a, b, style="invis")


def _model_name(obj: Any, gm: GraphModule) -> str:
    from .model import IA3Model

    return type(obj.get_base_model()).__name__ if isinstance(obj, IA3Model) else type(gm).__name__


def _title(name: str, records: list[_N], layout: _Layout, diff: GraphDiff | None) -> str:
    sites = [r for r in records if r.site is not None and r.status != "removed"]
    scaled = sum(bool(r.site_scales) for r in sites)
    n_scale = sum(r.role == "scale" and r.status != "removed" for r in records)
    parts = [f"{name}: {layout.view} view", f"{scaled} of {len(sites)} call sites scaled ({n_scale} scale nodes)"]
    top = min((r.parent.count(".") for r in layout.runs), default=0)
    folds = [f"{run.label_path()} × {run.size}" for run in layout.runs if run.parent.count(".") == top]
    if folds:
        parts.append("folded: " + ", ".join(folds))
    if diff is not None:
        roles: dict[str, int] = {}
        for r in records:
            if r.status == "added":
                key = r.role or r.op
                roles[key] = roles.get(key, 0) + 1
        detail = ", ".join(f"{v} {k} node{'s' if v > 1 else ''}" for k, v in roles.items())
        parts.append(f"diff: {diff.summary()}" + (f" ({detail})" if detail else ""))
    return "\\n".join(parts)


def _expand_list(expand: str | Sequence[str] | None, records: list[_N]) -> list[str]:
    if expand is None:
        return []
    paths = [expand] if isinstance(expand, str) else list(expand)
    known = set()
    for r in records:
        known.update(_prefixes(r.module) if r.module else ())
    for p in paths:
        if p not in known:
            near = difflib.get_close_matches(p, sorted(known), n=5, cutoff=0.6)
            raise ValueError(
                f"expand={p!r}: no module with that path in the graph"
                + (f"; modules near it: {', '.join(near)}" if near else "")
            )
    return paths


def to_dot(
    model_or_graph: Any,
    *,
    view: str = "folded",
    expand: str | Sequence[str] | None = None,
    base: Any = None,
    legend: bool = True,
) -> graphviz.Digraph:
    """The DOT graph :func:`draw` would write (a ``graphviz.Digraph``; ``.source`` is the text)."""
    return _dot_and_layout(model_or_graph, view=view, expand=expand, base=base, legend=legend)[0]


def _dot_and_layout(
    model_or_graph: Any, *, view: str, expand: Any, base: Any, legend: bool
) -> tuple[graphviz.Digraph, _Layout, GraphModule]:
    """The DOT graph with the layout that decided it (folds, what is drawn) and the graph drawn."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    if base is not None and view != "diff":
        raise ValueError("base= is only used by view='diff'")
    gm = graph_of(model_or_graph, "draw()")
    records = _records(gm)
    classes = module_classes(gm)
    diff = None
    if view == "diff":
        base_records = None
        if base is not None:
            base_gm = graph_of(base, "draw()")
            base_records = _records(base_gm)
            classes = {**module_classes(base_gm), **classes}
        records, diff = _diff_records(records, base_records)
    layout = _Layout(records, classes, view, _expand_list(expand, records), diff)
    items, edges = layout.build()
    g = graphviz.Digraph(
        name=type(gm).__name__,
        graph_attr={
            "rankdir": "TB", "fontname": _FONT, "fontsize": "12", "labelloc": "t", "labeljust": "l",
            "nodesep": "0.2", "ranksep": "0.3", "newrank": "true",
            "label": _title(_model_name(model_or_graph, gm), records, layout, diff),
        },
        node_attr={"fontname": _FONT, "fontsize": "10", "shape": "box", "height": "0.3", "margin": "0.08,0.03"},
        edge_attr={"color": COLORS["edge"], "arrowsize": "0.6"},
    )
    if legend:
        _legend(g, diff is not None)
    _emit(g, _cluster_tree(items), layout, "")
    for u, v, attrs in edges:
        g.edge(u, v, **attrs)
    return g, layout, gm


def draw(
    model_or_graph: Any,
    path: str | os.PathLike | None = None,
    *,
    view: str = "folded",
    expand: str | Sequence[str] | None = None,
    base: Any = None,
    legend: bool = True,
) -> graphviz.Digraph:
    """Draw an ``IA3Model`` or ``GraphModule`` to ``path`` (``.dot``/``.gv``, ``.svg``, ``.png``, ``.pdf``, ``.html``).

    ``view``: ``"folded"`` (module clusters, identical repeated blocks drawn once as ``× N``),
    ``"full"`` (every node) or ``"diff"`` (what the rewrite added against ``base``; default: the
    nodes ia3fx tagged). ``expand``: module path(s) to draw in full inside the folded view, e.g.
    ``"model.layers.3"``. Returns the ``graphviz.Digraph``; with ``path=None`` nothing is written.
    A ``.dot`` file needs no Graphviz binary; other formats need ``dot`` on ``PATH``. ``.html`` writes
    the interactive page of :mod:`ia3fx.viz_html` (pan, zoom, search, click a fold to expand it).
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower() if path is not None else ""
    if suffix == ".html":  # the interactive page: its own module (pan, zoom, search, expand, hover)
        from .viz_html import write_html

        return write_html(model_or_graph, path, view=view, expand=expand, base=base)
    g = to_dot(model_or_graph, view=view, expand=expand, base=base, legend=legend)
    if path is None:
        return g
    path = os.fspath(path)
    if suffix in _SOURCE:
        data = g.source.encode()
    elif suffix in _BITMAP:
        try:
            data = g.pipe(format=_BITMAP[suffix])
        except graphviz.ExecutableNotFound as e:
            raise RuntimeError(
                f"writing {suffix} needs Graphviz's `dot` program, which is not on PATH; install Graphviz "
                "(e.g. apt-get install graphviz) or write a .dot file"
            ) from e
    else:
        known = ", ".join(_SOURCE + tuple(_BITMAP))
        raise ValueError(f"cannot tell the format from {path!r}: use one of {known} or .html")
    _write_file(path, data)
    return g


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary next to it, so a failed write leaves no partial file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    # a temporary next to it, renamed into place: a failed write (a full disk) leaves no partial
    # file, and a previous drawing as it was
    staged = temp_path(directory or ".", os.path.basename(path))
    try:
        with open(staged, "wb") as f:
            f.write(data)
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)
        raise
