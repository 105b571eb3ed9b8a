"""``insert_scales``: one multiply by a vector per targeted call site.

Attention-type sites get their output scaled (bias included, as PEFT's wrapper does), feedforward
sites their input. The graph reads the vectors through ``get_attr`` nodes under ``gm.ia3_l``; the
vectors themselves belong to whoever passes them in, so several graphs can share them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..sites import CallSite, get_attr_path
from ._graph import VECTOR_ROOT, set_tensor, tag

__all__ = ["InsertResult", "insert_scales", "vector_attr"]

aten = torch.ops.aten


@dataclass
class InsertResult:
    """What ``insert_scales`` did: the scale nodes it added, per layer name."""

    inserted: dict[str, list[str]] = field(default_factory=dict)
    already_scaled: int = 0

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.inserted.values())


def vector_attr(name: str) -> str:
    return f"{VECTOR_ROOT}.{name}"


def _input_node(gm: GraphModule, node: Node, site: CallSite) -> Node:
    index = 1 if site.kind in ("conv1d", "functional_addmm") and node.op == "call_function" else 0
    x = node.args[index]
    if not isinstance(x, Node):
        raise ValueError(f"call site {site.node} ({site.name}) has no graph input to scale")
    return x


def insert_scales(
    gm: GraphModule,
    sites: Sequence[CallSite],
    vectors: Mapping[str, torch.Tensor],
) -> tuple[GraphModule, InsertResult]:
    """Scale every targeted site in ``sites`` by ``vectors[site.name]``; idempotent."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    result = InsertResult()
    for name in {s.name for s in sites if s.targeted}:
        if name not in vectors:
            raise KeyError(f"no vector for targeted layer {name!r}")
        set_tensor(gm, vector_attr(name), vectors[name])
    for site in sites:
        if not site.targeted:
            continue
        node = nodes[site.node]
        if node.meta.get("ia3fx_scaled"):
            result.already_scaled += 1
            continue
        vec = vectors[site.name]
        weight = get_attr_path(gm, site.weight)
        cast = vec.dtype != weight.dtype  # half bases keep fp32 vectors; round once, as PEFT
        info = dict(layer=site.name, scale=site.scale)
        if site.feedforward:
            x = _input_node(gm, node, site)
            with graph.inserting_before(node):
                v = graph.get_attr(vector_attr(site.name))
                last = mul = graph.call_function(aten.mul.Tensor, (x, v))
                if cast:
                    last = graph.call_function(aten.type_as.default, (mul, x))
            node.replace_input_with(x, last)
            new = [v, mul] + ([last] if cast else [])
        else:
            with graph.inserting_after(node):
                v = graph.get_attr(vector_attr(site.name))
            with graph.inserting_after(v):
                mul = graph.call_function(aten.mul.Tensor, (node, v))
            last = mul
            if cast:
                with graph.inserting_after(mul):
                    last = graph.call_function(aten.type_as.default, (mul, node))
            keep = {mul, last}
            node.replace_all_uses_with(last, delete_user_cb=lambda u: u not in keep)
            new = [v, mul] + ([last] if cast else [])
        for n, role in zip(new, ("vector", "scale", "cast")):
            tag(n, node, role=role, **info)
        src = x if site.feedforward else node
        if "val" in src.meta:
            last.meta["val"] = src.meta["val"]
        node.meta["ia3fx_scaled"] = site.scale
        result.inserted.setdefault(site.name, []).append(mul.name)
    graph.lint()
    gm.recompile()
    return gm, result
