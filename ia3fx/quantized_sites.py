"""Linear call sites on quantized weights: a linear that tracing expanded into a quantized kernel is
folded back into one ``F.linear`` call on the quantized weight.

torchao quantizes an ``nn.Linear`` by swapping its weight for a tensor subclass (``Int8Tensor``,
``IntxUnpackedToInt8Tensor``, ...) whose ``F.linear`` runs the quantized kernel. ``torch.export``
traces *through* the subclass: the captured graph reads the weight's inner tensors
(``access_subclass_inner_tensor(w, "qdata")``) and computes with them (``_int_mm``, a dynamic
quantization of the input, a multiply by the row scales, ...), and no ``linear`` node is left to
scale. The nodes all carry the ``nn.Linear``'s ``nn_module_stack`` entry, though, and
``nn.Linear.forward`` is exactly ``F.linear(input, self.weight, self.bias)``; so the region of
nodes of one such call, with one activation coming in and one value going out, *is*
``F.linear(x, weight, bias)`` on the subclass, and is replaced by that call. Run eagerly, the
call dispatches to the subclass's kernel: the graph computes what the quantized model computes
(what PEFT's wrapper calls too), and the usual call-site machinery (scales, folding, drawing,
re-export) works on it unchanged.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["collapse_quantized_linears", "is_quantized_weight"]

try:  # the op torch.export reads a subclass's inner tensors with
    _INNER = torch.ops.export.access_subclass_inner_tensor.default
except (AttributeError, RuntimeError):  # pragma: no cover - a torch without it traces no subclasses
    _INNER = None


def is_quantized_weight(value: Any) -> bool:
    """A weight that is not a plain floating tensor: a tensor subclass that computes with inner
    tensors (torchao), or a bitsandbytes parameter holding int8 / packed 4-bit data."""
    if not isinstance(value, torch.Tensor):
        return False
    if is_traceable_wrapper_subclass(value):
        return True
    module = type(value).__module__ or ""
    return module.startswith("bitsandbytes") and not value.is_floating_point()


def _linear_class(name: Any) -> bool:
    """Whether the module class named in an ``nn_module_stack`` entry runs ``nn.Linear.forward``."""
    if isinstance(name, type):
        cls: Any = name
    else:
        path, _, qualname = str(name).rpartition(".")
        cls = getattr(sys.modules.get(path), qualname, None)  # only classes already imported
    return isinstance(cls, type) and issubclass(cls, nn.Linear) and cls.forward is nn.Linear.forward


def _innermost(node: Node) -> tuple[str, str, Any] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (fqn, cls) = list(stack.items())[-1]
    return key, fqn, cls


def _get_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _weight_read(node: Node, weights: dict[str, Node]) -> Node | None:
    """The weight ``get_attr`` that ``node`` is (or reads an inner tensor of), else ``None``."""
    if node.op == "get_attr" and node.target in weights:
        return node
    if node.op == "call_function" and node.target is _INNER and isinstance(node.args[0], Node):
        src = node.args[0]
        return src if src.op == "get_attr" and src.target in weights else None
    return None


def collapse_quantized_linears(gm: GraphModule) -> list[str]:
    """Replace each traced-through linear on a quantized weight by ``F.linear(x, w[, b])``.

    Returns the layer paths collapsed (in graph order; a layer called twice appears twice). Only
    regions that are certainly one ``nn.Linear`` call are touched: a module whose class runs
    ``nn.Linear.forward``, whose ``weight`` is a quantized tensor subclass, read by nodes with one
    activation input and one output. Anything else is left as it is (and a targeted layer there
    is refused by :func:`~ia3fx.sites.check_targets_scaled`).
    """
    graph = gm.graph
    weights: dict[str, Node] = {}
    for n in graph.nodes:
        if n.op == "get_attr" and is_traceable_wrapper_subclass(_get_attr(gm, n.target)):
            weights[n.target] = n
    if not weights:
        return []
    regions: dict[str, list[Node]] = {}  # nn_module_stack key (one per call) -> its nodes
    owners: dict[str, tuple[str, Any]] = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.meta.get("ia3fx"):
            continue
        inner = _innermost(n)
        if inner is None:
            continue
        key, fqn, cls = inner
        if f"{fqn}.weight" in weights:
            regions.setdefault(key, []).append(n)
            owners[key] = (fqn, cls)
    collapsed = []
    for key, nodes in regions.items():
        fqn, cls = owners[key]
        if not _linear_class(cls) or any(n.target is F.linear for n in nodes):
            continue  # not nn.Linear's call, or collapsed already
        if _collapse(gm, fqn, nodes, weights):
            collapsed.append(fqn)
    if collapsed:
        for n in reversed(list(graph.nodes)):  # inner-tensor reads left without users
            if n.op == "call_function" and n.target is _INNER and not n.users:
                graph.erase_node(n)
        graph.lint()
        gm.recompile()
    return collapsed


def _collapse(gm: GraphModule, fqn: str, nodes: list[Node], weights: dict[str, Node]) -> bool:
    graph = gm.graph
    region = set(nodes)
    weight = weights[f"{fqn}.weight"]
    bias_path = f"{fqn}.bias"
    bias = None
    activations: list[Node] = []
    read_weight = False
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg in region:
                continue
            if _weight_read(arg, weights) is weight:
                read_weight = True
            elif arg.op == "get_attr" and arg.target == bias_path:
                bias = arg
            elif arg.op == "get_attr" and not isinstance(_get_attr(gm, arg.target), nn.Parameter):
                continue  # a constant made by the trace (part of the kernel)
            elif arg.op != "get_attr" and not isinstance(arg.meta.get("val"), torch.Tensor):
                continue  # a size (``sym_size`` of a dynamic dim): the call recomputes its own
            elif arg not in activations:
                activations.append(arg)
    outputs = [n for n in nodes if any(u not in region for u in n.users)]
    if not read_weight or len(activations) != 1 or len(outputs) != 1:
        return False
    if bias is None and isinstance(_get_attr(gm, bias_path), torch.Tensor):
        return False  # the module has a bias the region does not read: not nn.Linear's call
    (x,), (out,) = activations, outputs
    with graph.inserting_after(out):
        # ``F.linear``, as ``nn.Linear.forward`` calls it: the subclasses take it at the
        # ``__torch_function__`` level (``aten.linear`` would decompose before reaching them)
        linear = graph.call_function(F.linear, (x, weight) if bias is None else (x, weight, bias))
    linear.meta.update({k: out.meta[k] for k in ("nn_module_stack", "val", "stack_trace") if k in out.meta})
    out.replace_all_uses_with(linear, delete_user_cb=lambda u: u is not linear)
    for n in reversed(nodes):
        graph.erase_node(n)
    return True
