"""What a trained vector does, in numbers every view shows the same way: mean, min, max, |v - 1|.

(IA)³ vectors start at ones, so how far a vector moved from ones (``|v - 1|``: its mean and its
largest entry) says how much the adapter uses that layer. The interactive page, Model Explorer's
overlays and ``Report.plot`` all read their numbers from here, so they agree with each other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from .analysis import IA3_KEY
from .sites import get_attr_path

__all__ = ["vector_stats", "graph_vectors", "STAT_KEYS"]

STAT_KEYS = ("mean", "min", "max", "mean_abs_dev", "max_abs_dev", "std_abs_dev")


def vector_stats(vector: torch.Tensor) -> dict[str, float] | None:
    """``mean``, ``min``, ``max`` of the vector; ``mean_abs_dev``, ``max_abs_dev``, ``std_abs_dev`` of ``|v - 1|``.

    ``None`` for a vector without values (the meta device): there is nothing to summarise.
    """
    if vector.device.type == "meta":
        return None
    v = vector.detach().float().reshape(-1)
    if v.numel() == 0:
        return None
    dev = (v - 1).abs()
    return {
        "mean": v.mean().item(),
        "min": v.min().item(),
        "max": v.max().item(),
        "mean_abs_dev": dev.mean().item(),
        "max_abs_dev": dev.max().item(),
        "std_abs_dev": dev.std(correction=0).item(),  # the spread across the vector's entries
    }


def graph_vectors(gm: GraphModule) -> dict[tuple[str, str], Any]:
    """``(layer, placement) -> tensor`` for every vector the graph reads (its ``get_attr`` nodes)."""
    out: dict[tuple[str, str], Any] = {}
    for node in gm.graph.nodes:
        info = node.meta.get(IA3_KEY) or {}
        if info.get("role") != "vector" or node.op != "get_attr":
            continue
        try:
            out[(info["layer"], info["scale"])] = get_attr_path(gm, node.target)
        except AttributeError:  # a slot not bound (a graph copied without its vectors): no numbers
            continue
    return out
