"""``redirect_modules_to_save``: make the graph run trained copies of whole modules.

PEFT's ``modules_to_save`` keeps the original module frozen and trains a copy; here the graph's
reads of that module's parameters and buffers are pointed at the copy, which lives under
``gm.modules_to_save.<path>``. Reads from outside the module (a weight tied to an embedding) keep
the original, as PEFT's wrapper does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule

from ._graph import SAVED_ROOT, owner_path, set_module

__all__ = ["RedirectResult", "redirect_modules_to_save"]


@dataclass
class RedirectResult:
    redirected: dict[str, list[str]] = field(default_factory=dict)  # module -> attributes read


def _inside(path: str | None, module: str) -> bool:
    return path is None or path == module or path.startswith(module + ".")


def redirect_modules_to_save(
    gm: GraphModule, copies: Mapping[str, nn.Module]
) -> tuple[GraphModule, RedirectResult]:
    result = RedirectResult()
    graph = gm.graph
    for module, copy in copies.items():
        set_module(gm, f"{SAVED_ROOT}.{module}", copy)
        prefix = module + "."
        for node in list(graph.nodes):
            if node.op == "call_module" and (node.target == module or node.target.startswith(prefix)):
                node.target = f"{SAVED_ROOT}.{node.target}"
                result.redirected.setdefault(module, []).append(node.target)
                continue
            if node.op != "get_attr" or not node.target.startswith(prefix):
                continue
            new_target = f"{SAVED_ROOT}.{node.target}"
            inside = [u for u in node.users if _inside(owner_path(u), module)]
            if not inside:
                continue
            if len(inside) == len(node.users):
                node.target = new_target
            else:
                with graph.inserting_after(node):
                    copy_node = graph.get_attr(new_target)
                copy_node.meta.update(node.meta)
                for user in inside:
                    user.replace_input_with(node, copy_node)
            result.redirected.setdefault(module, []).append(new_target)
    graph.lint()
    gm.recompile()
    return gm, result
