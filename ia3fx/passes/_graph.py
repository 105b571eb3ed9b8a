"""Small helpers shared by the passes: attribute paths on a GraphModule, node ownership."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule, Node

VECTOR_ROOT = "ia3_l"  # gm.ia3_l.<layer path>: the vectors a graph reads
SAVED_ROOT = "modules_to_save"  # gm.modules_to_save.<module path>: trained copies


def container(gm: GraphModule, path: str) -> nn.Module:
    """The module at ``path`` in ``gm``, creating plain containers on the way."""
    mod: nn.Module = gm
    for part in path.split(".") if path else []:
        child = mod._modules.get(part)  # direct: nn.Module.__getattr__ is slow on a deep walk
        if child is None:
            child = getattr(mod, part, None)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        elif not isinstance(child, nn.Module):
            raise ValueError(
                f"cannot place an ia3fx attribute under {path!r}: {part!r} is a {type(child).__name__}, "
                "not a module (a layer name that is a prefix of another layer's name)"
            )
        mod = child
    return mod


def set_tensor(gm: GraphModule, path: str, value: torch.Tensor) -> None:
    """Bind ``value`` at ``path`` (a parameter stays a parameter, a tensor becomes a buffer)."""
    parent, _, name = path.rpartition(".")
    mod = container(gm, parent)
    if isinstance(value, nn.Parameter):
        if name in mod._buffers:
            del mod._buffers[name]
        mod.register_parameter(name, value)
    else:
        if name in mod._parameters:
            del mod._parameters[name]
        mod.register_buffer(name, value, persistent=False)


def set_module(gm: GraphModule, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    container(gm, parent).add_module(name, value)


def owner_path(node: Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def tag(node: Node, like: Node, **info: object) -> None:
    """Mark ``node`` as ia3fx's and attribute it to ``like``'s module (re-export keeps that)."""
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])
    node.meta["ia3fx"] = dict(info)
