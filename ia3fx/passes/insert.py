"""``insert_scales``: one multiply by a vector per targeted call site and placement.

Attention-type sites get their output scaled (bias included, as PEFT's wrapper does), feedforward
sites their input. The graph reads each vector through a ``get_attr`` of
``gm.ia3_l.<layer>.<placement>`` (a *slot*); what is bound there (one adapter's parameter, a
product of several, or ones when adapters are off) is the caller's choice, so switching adapters
never needs a new trace, and several graphs can share the same parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..sites import CallSite, get_attr_path
from ._graph import VECTOR_ROOT, set_tensor, tag

__all__ = ["InsertResult", "insert_scales", "slot_attr", "Slot", "PLACEMENTS"]

aten = torch.ops.aten
PLACEMENTS = ("input", "output")
Slot = tuple[str, str]  # (layer name, "input" | "output")


@dataclass
class InsertResult:
    """What ``insert_scales`` did: the scale nodes it added, per slot."""

    inserted: dict[Slot, list[str]] = field(default_factory=dict)
    already_scaled: int = 0

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.inserted.values())


def slot_attr(layer: str, placement: str) -> str:
    return f"{VECTOR_ROOT}.{layer}.{placement}"


def _input_node(node: Node, site: CallSite) -> Node:
    index = 1 if site.kind in ("conv1d", "functional_addmm") and node.op == "call_function" else 0
    x = node.args[index]
    if not isinstance(x, Node):
        raise ValueError(f"call site {site.node} ({site.name}) has no graph input to scale")
    return x


def _slots(sites: Sequence[CallSite], vectors: Mapping) -> dict[Slot, torch.Tensor]:
    slots: dict[Slot, torch.Tensor] = {}
    for key, value in vectors.items():
        if isinstance(key, tuple):
            if key[1] not in PLACEMENTS:
                raise ValueError(f"slot {key}: placement must be one of {PLACEMENTS}")
            slots[key] = value
    for site in sites:
        if site.targeted and site.name in vectors:
            slots[(site.name, site.scale)] = vectors[site.name]
    return slots


def insert_scales(
    gm: GraphModule,
    sites: Sequence[CallSite],
    vectors: Mapping[str | Slot, torch.Tensor],
    *,
    cast: bool = False,
) -> tuple[GraphModule, InsertResult]:
    """Scale call sites by vectors; idempotent (a slot already in the graph is left alone).

    ``vectors`` maps a layer name to its vector (placed where the annotated site says: input if
    feedforward, else output) or a ``(layer, placement)`` slot to a vector. A scaled value is cast
    back to the dtype it had (PEFT's rounding) when the vector's dtype differs from the weight's, or
    always with ``cast`` (a graph run under autocast, where the layer's output dtype is not its
    weight's).
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    slots = _slots(sites, vectors)
    result = InsertResult()
    for (layer, placement), vec in slots.items():
        set_tensor(gm, slot_attr(layer, placement), vec)
    for site in sites:
        node = nodes.get(site.node)
        if node is None:
            continue
        for placement in PLACEMENTS:
            slot = (site.name, placement)
            if slot not in slots:
                continue
            done = node.meta.get("ia3fx_scaled", ())
            if placement in done:
                result.already_scaled += 1
                continue
            at = nodes[site.output] if placement == "output" and site.output else node
            mul = _insert(gm, at, site, placement, slots[slot], cast)
            node.meta["ia3fx_scaled"] = (*done, placement)  # a new tuple: graph copies share meta
            result.inserted.setdefault(slot, []).append(mul.name)
    graph.lint()
    gm.recompile()
    return gm, result


def _insert(gm: GraphModule, node: Node, site: CallSite, placement: str, vec: torch.Tensor, cast: bool) -> Node:
    graph = gm.graph
    weight = get_attr_path(gm, site.weight)
    cast = cast or vec.dtype != weight.dtype  # half bases keep fp32 vectors; round once, as PEFT
    target = slot_attr(site.name, placement)
    if placement == "input":
        x = _input_node(node, site)
        with graph.inserting_before(node):
            v = _read(graph, target)
            last = mul = graph.call_function(aten.mul.Tensor, (x, v))
            if cast:
                last = graph.call_function(aten.type_as.default, (mul, x))
        node.replace_input_with(x, last)
        src = x
    else:
        with graph.inserting_after(node):
            v = _read(graph, target)
        with graph.inserting_after(v):
            mul = graph.call_function(aten.mul.Tensor, (node, v))
        last = mul
        if cast:
            with graph.inserting_after(mul):
                last = graph.call_function(aten.type_as.default, (mul, node))
        keep = {mul, last}
        node.replace_all_uses_with(last, delete_user_cb=lambda u: u not in keep)
        src = node
    new = [v, mul] + ([last] if cast else [])
    for n, role in zip(new, ("vector", "scale", "cast")):
        tag(n, node, role=role, layer=site.name, scale=placement, site=site.node)
    if "val" in src.meta:
        last.meta["val"] = src.meta["val"]
    return mul


def _read(graph: torch.fx.Graph, target: str) -> Node:
    # ``Graph.get_attr`` first walks the module tree to warn about a missing attribute (a tenth of
    # the rewrite time on a 7B-shaped graph); the slot was bound just before, so go straight on
    return graph.create_node("get_attr", target)
