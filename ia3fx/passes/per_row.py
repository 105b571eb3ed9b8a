"""``scale_per_row``: a copy of an adapted graph whose scale multiplies take one vector per row.

Each ``mul(x, v)`` that ``insert_scales`` added becomes ``mul(x, broadcast_rows(v, x))``: ``v`` is
then ``(rows, *shape)``, one vector per batch row (see :mod:`ia3fx.mixed`). Where the graph reads
its vectors itself (a whole-model graph's ``get_attr`` slots), the reads go to a module at
``gm.ia3_rows`` called with ``(layer, placement)``, which returns the call's per-row vectors: the
live model's row choice, or an exported program's table indexed by its ``adapter_index`` input.
A block graph's slots are inputs already: its runner passes the per-row vectors.

The source graph is not changed; the copy shares its parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from ..mixed import RowMismatchError, broadcast_rows
from ._graph import VECTOR_ROOT

__all__ = ["PerRowResult", "scale_per_row", "ROWS_ATTR"]

ROWS_ATTR = "ia3_rows"


@dataclass
class PerRowResult:
    """What ``scale_per_row`` changed: the scale nodes (by name) and the slot reads it redirected."""

    scales: list[str] = field(default_factory=list)
    reads: list[tuple[str, str]] = field(default_factory=list)


def scale_per_row(
    gm: GraphModule,
    rows_module: nn.Module | None = None,
    attrs: Mapping[str, object] | None = None,
    rows_attr: str = ROWS_ATTR,
) -> tuple[GraphModule, PerRowResult]:
    """The per-row copy of ``gm``. With ``rows_module`` (at ``gm.<rows_attr>``), slot ``get_attr``
    reads call it instead; ``attrs`` binds other targets of the copy to other objects (by path)."""
    attrs = attrs or {}
    from ..capture import _copy_graph

    graph = _copy_graph(gm)
    result = PerRowResult()
    prefix = VECTOR_ROOT + "."
    for node in list(graph.nodes):
        info = node.meta.get("ia3fx") or {}
        if info.get("role") == "vector" and node.op == "get_attr" and rows_module is not None:
            layer, _, placement = node.target[len(prefix):].rpartition(".")
            with graph.inserting_before(node):
                read = graph.call_module(rows_attr, (layer, placement))
            read.meta.update(node.meta)
            node.replace_all_uses_with(read)
            graph.erase_node(node)
            result.reads.append((layer, placement))
        elif info.get("role") == "scale":
            x, v = node.args
            _check_rows_follow(x, info.get("layer"))
            with graph.inserting_before(node):
                rows = graph.call_function(broadcast_rows, (v, x))
            rows.meta["ia3fx"] = dict(info, role="rows")
            if "nn_module_stack" in node.meta:
                rows.meta["nn_module_stack"] = node.meta["nn_module_stack"]
            node.args = (x, rows)
            result.scales.append(node.name)
    root: dict[str, object] = {}
    for node in graph.nodes:  # what the copy reads, shared with ``gm`` (and the rows module)
        if node.op in ("get_attr", "call_module") and node.target not in root:
            if node.target == rows_attr:
                root[node.target] = rows_module
            else:
                root[node.target] = attrs[node.target] if node.target in attrs else _attr(gm, node.target)
    out = GraphModule(root, graph, type(gm).__name__)
    out.meta.update({k: v for k, v in gm.meta.items() if k != "ia3fx"})
    graph.lint()
    out.recompile()
    return out, result


def _check_rows_follow(x: torch.fx.Node, layer: object) -> None:
    """A scaled value whose leading size is data-dependent (tokens routed to an expert, a masked
    selection) holds no fixed rows of the batch: per-row vectors cannot follow them."""
    val = x.meta.get("val")
    shape = getattr(val, "shape", None)
    if not shape:
        return
    lead = shape[0]
    symbols = getattr(getattr(lead, "node", None), "expr", None)
    names = {str(s) for s in getattr(symbols, "free_symbols", ())}
    if any(n.startswith("u") for n in names):
        raise RowMismatchError(
            f"layer {layer} runs on a data-dependent selection of rows (size {lead}: routed tokens, a mask): "
            "per-row adapters (adapter_names) cannot follow the batch there. Run one adapter per call for this model"
        )


def _attr(gm: GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj

