"""``fold_scales``: fold every scale node into its call site's weights and remove it.

The result has exactly the base graph's operations, except on a quantized weight where a vector
does not fold without new rounding (``quantized_merge.py``): that scale node is kept
(``FoldResult.kept``). Folded weights are new tensors bound in the
graph's own containers, so the model the graph was captured from is not touched. A weight that
something other than the folded layer also reads (a tied embedding) is refused with an error
naming both readers: folding it would silently scale the other one too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from ..quantized_merge import fold_quantized, is_quantized_weight
from ..scaling import fold_bias, fold_weight
from ..sites import CallSite, find_call_sites, get_attr_path
from ._graph import VECTOR_ROOT, owner_path, set_module, set_tensor

__all__ = ["FoldResult", "fold_scales", "SharedWeightError"]


class SharedWeightError(ValueError):
    """A weight to fold is read by another layer too (tied or shared)."""


@dataclass
class FoldResult:
    folded: dict[str, list[str]] = field(default_factory=dict)  # layer -> placements folded
    kept: dict[str, list[str]] = field(default_factory=dict)  # layer -> placements kept as a multiply (quantized)
    removed_nodes: int = 0


def _scale_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.meta.get("ia3fx", {}).get("role") == "scale"]


def _readers(gm: GraphModule, tensor: torch.Tensor, skip: set[str]) -> list[str]:
    """Non-ia3fx nodes (other than ``skip``) that read ``tensor`` through any get_attr."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.meta.get("ia3fx"):
            continue
        try:
            value = get_attr_path(gm, n.target)
        except AttributeError:
            continue
        if value is not tensor:
            continue
        for user in n.users:
            if user.name not in skip and not user.meta.get("ia3fx"):
                out.append(f"{user.name} (module {owner_path(user) or '?'}, via {n.target})")
    return out


def _check_unshared(gm: GraphModule, layer: str, sites: list[CallSite], weight: torch.Tensor) -> None:
    readers = _readers(gm, weight, {n for s in sites for n in (s.node, *s.reads)})
    if readers:
        raise SharedWeightError(
            f"cannot fold the vector of {layer!r}: its weight {sites[0].weight!r} is also read by "
            f"{readers[0]}{' and others' if len(readers) > 1 else ''}, which would be scaled too. "
            f"Exclude {layer!r} from the adapter, or untie the weights before merging."
        )


def fold_scales(gm: GraphModule) -> tuple[GraphModule, FoldResult]:
    """Fold and remove every ia3fx scale node of ``gm`` (in place on ``gm``'s own bindings)."""
    result = FoldResult()
    scale_nodes = _scale_nodes(gm)
    if not scale_nodes:
        return gm, result
    sites_by_node = {s.node: s for s in find_call_sites(gm)}
    by_layer: dict[str, list[Node]] = {}
    for n in scale_nodes:
        by_layer.setdefault(n.meta["ia3fx"]["layer"], []).append(n)
    # compute every folded tensor first: a refusal leaves the graph as it was
    plans = []
    for layer, nodes in by_layer.items():
        sites = [sites_by_node[n.meta["ia3fx"]["site"]] for n in nodes if n.meta["ia3fx"]["site"] in sites_by_node]
        sites = list({s.node: s for s in sites}.values())
        if not sites:
            raise ValueError(f"scale nodes of {layer!r} are not attached to a linear call site")
        site = sites[0]
        weight = get_attr_path(gm, site.weight)
        _check_unshared(gm, layer, sites, weight)
        bias = get_attr_path(gm, site.bias) if site.bias else None
        new_w, new_b = weight.detach() if not is_quantized_weight(weight) else weight, bias.detach() if bias is not None else None
        placements = sorted({n.meta["ia3fx"]["scale"] for n in nodes})
        folded = []
        for placement in placements:
            vec = get_attr_path(gm, f"{VECTOR_ROOT}.{layer}.{placement}").detach()
            ff = placement == "input"
            if is_quantized_weight(new_w):  # only where no new rounding comes in: quantized_merge.py
                fold = fold_quantized(new_w, new_b, vec, ff)
                if fold.how == "kept":
                    result.kept[layer] = [*result.kept.get(layer, []), placement]
                    continue
                new_w, new_b = fold.weight, fold.bias
            else:
                new_b = fold_bias(new_b, vec, site.kind, ff, new_w.dtype)
                new_w = fold_weight(new_w, vec, site.kind, ff, site.groups)
            folded.append(placement)
        if folded:
            plans.append((layer, site, folded, new_w, new_b))
    for layer, site, placements, new_w, new_b in plans:
        _bind_weight(gm, site, new_w, new_b)
        result.folded[layer] = placements
    for n in gm.graph.nodes:
        n.meta.pop("ia3fx_scaled", None)
    for n in scale_nodes:
        info = n.meta["ia3fx"]
        if info["scale"] in result.kept.get(info["layer"], ()):
            continue  # stays a multiply: the vector does not fold into the quantized weight exactly
        result.removed_nodes += _remove_scale(gm, n)
    for n in list(gm.graph.nodes):  # vector reads left without users
        if n.op == "get_attr" and n.meta.get("ia3fx") and not n.users:
            gm.graph.erase_node(n)
            result.removed_nodes += 1
    if hasattr(gm, VECTOR_ROOT) and not result.kept:
        delattr(gm, VECTOR_ROOT)
    gm.graph.lint()
    gm.recompile()
    return gm, result


def _bind_weight(gm: GraphModule, site: CallSite, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    node = next(n for n in gm.graph.nodes if n.name == site.node)
    if node.op == "call_module":  # the module may be the user's own: bind a folded copy instead
        import copy

        clone = copy.deepcopy(gm.get_submodule(node.target))
        clone.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            clone.bias = nn.Parameter(bias, requires_grad=False)
        set_module(gm, node.target, clone)
        return
    set_tensor(gm, site.weight, nn.Parameter(weight, requires_grad=False))
    if bias is not None and site.bias:
        set_tensor(gm, site.bias, nn.Parameter(bias, requires_grad=False))


def _remove_scale(gm: GraphModule, mul: Node) -> int:
    """Bypass ``mul`` (and its cast) and erase them: ``mul(x, v)`` -> ``x``."""
    removed = 0
    x = mul.args[0]
    last = mul
    cast = next((u for u in mul.users if u.meta.get("ia3fx", {}).get("role") == "cast"), None)
    if cast is not None:
        last = cast
    last.replace_all_uses_with(x)
    for n in (cast, mul):
        if n is not None:
            gm.graph.erase_node(n)
            removed += 1
    return removed
