"""Call sites: every linear-like call on a parameter in a captured graph.

A *call site* is one node; a *layer* is what owns a vector (a module, or for a bare ``F.linear``
on a parameter, that parameter). A module called twice gives two call sites of one layer, which
then share one vector, as PEFT's module-level wrapping means.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from .errors import UnscaledTargetError

__all__ = ["CallSite", "find_call_sites", "get_attr_path", "vector_shape", "check_targets_scaled"]

aten = torch.ops.aten

_LINEAR = {aten.linear.default, torch._C._nn.linear, F.linear}
_ADDMM = {aten.addmm.default, torch.addmm}
_CONV2D = {aten.conv2d.default, torch.conv2d, F.conv2d}
_CONV3D = {aten.conv3d.default, torch.conv3d, F.conv3d}
# ``x @ w.T`` (Falcon's FalconLinear, hand-written layers): a matmul whose second operand is the
# transpose of a 2-d parameter is a linear call site on that parameter
_MATMUL = {id(t) for t in (aten.matmul.default, aten.mm.default, torch.matmul, torch.mm, operator.matmul)}
_TRANSPOSE_FUNCTIONS = {id(t) for t in (aten.numpy_T.default, aten.t.default, torch.t)}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_ADD = {id(t) for t in (aten.add.Tensor, torch.add, operator.add)}

# (op, weight index, bias index) by id(): OpOverload hashes in Python, and every node is looked up
_OPS = {
    id(t): spec
    for targets, spec in (
        (_LINEAR, ("linear", 1, 2)),
        (_ADDMM, ("addmm", 2, 0)),
        (_CONV2D, ("conv2d", 1, 2)),
        (_CONV3D, ("conv3d", 1, 2)),
    )
    for t in targets
}

# kinds whose vectors broadcast on the last dim vs on the channel dim
LINEAR_KINDS = ("linear", "conv1d", "functional_linear", "functional_addmm")
CONV_KINDS = {"conv2d": 2, "conv3d": 3, "functional_conv2d": 2, "functional_conv3d": 3}


@dataclass(frozen=True)
class CallSite:
    """One linear-like call in the graph and, once a config is applied, what IA3 does to it."""

    node: str  # graph node name
    name: str  # layer name used for matching and as the vector's key (module path or param path)
    module: str  # innermost owning module path, from nn_module_stack
    module_type: str  # class of the owning module
    kind: str  # linear | conv1d | conv2d | conv3d | functional_linear | functional_addmm | ...
    in_features: int
    out_features: int
    weight: str  # parameter path of the weight, as the graph reads it
    bias: str | None
    groups: int = 1
    call_index: int = 0  # 0 for a layer's first call, 1 for its second, ...
    output: str | None = None  # the node holding the layer's output when it is not ``node`` (a bias add)
    reads: tuple[str, ...] = ()  # nodes between the weight's get_attr and ``node`` (a transpose)
    targeted: bool = False
    feedforward: bool = False

    @property
    def scale(self) -> str | None:
        """``"input"`` (feedforward), ``"output"`` (attention-type) or ``None`` (not adapted)."""
        if not self.targeted:
            return None
        return "input" if self.feedforward else "output"

    @property
    def vector_size(self) -> int:
        return self.in_features if self.feedforward else self.out_features


def vector_shape(kind: str, size: int) -> tuple[int, ...]:
    """The in-graph shape: broadcasts on the feature (last) or channel dim."""
    spatial = CONV_KINDS.get(kind, 0)
    return (size,) + (1,) * spatial


def get_attr_path(gm: nn.Module, path: str) -> Any:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(node: Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    fqn, cls = list(stack.values())[-1]
    if not isinstance(cls, str):
        cls = f"{cls.__module__}.{cls.__qualname__}"
    return fqn, cls


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _param_name(weight_path: str) -> str:
    return weight_path[: -len(".weight")] if weight_path.endswith(".weight") else weight_path


def _function_site(gm: GraphModule, node: Node) -> CallSite | None:
    spec = _OPS.get(id(node.target))
    if spec is None:
        return None
    op, w_idx, b_idx = spec
    w = _arg(node, w_idx, "weight" if op != "addmm" else "mat2")
    if not isinstance(w, Node) or w.op != "get_attr":
        return None  # a computed weight is not a layer
    b = _arg(node, b_idx, "bias" if op != "addmm" else "input")
    bias = b.target if isinstance(b, Node) and b.op == "get_attr" else None
    weight = get_attr_path(gm, w.target)
    owner = _owner(node)
    module, module_type = owner if owner else (w.target.rpartition(".")[0], "")
    cls = module_type.rsplit(".", 1)[-1]
    groups = 1
    if op == "linear":
        out_f, in_f = weight.shape[0], weight.shape[1]
        layer = "Linear" in cls
        kind = "linear" if layer else "functional_linear"
    elif op == "addmm":
        in_f, out_f = weight.shape[0], weight.shape[1]
        layer = cls == "Conv1D"
        kind = "conv1d" if layer else "functional_addmm"
    else:
        groups = int(_arg(node, 6, "groups", 1))
        out_f, in_f = weight.shape[0], weight.shape[1] * groups
        layer = cls == op.capitalize()
        kind = op if layer else f"functional_{op}"
    name = module if layer else _param_name(w.target)
    return CallSite(
        node=node.name,
        name=name,
        module=module,
        module_type=module_type,
        kind=kind,
        in_features=int(in_f),
        out_features=int(out_f),
        weight=w.target,
        bias=bias,
        groups=groups,
    )


def _transposed_parameter(gm: GraphModule, node: Any) -> Node | None:
    """The ``get_attr`` of a 2-d parameter that ``node`` transposes, if it is one."""
    if not isinstance(node, Node) or not node.args:
        return None
    src = node.args[0]
    if not isinstance(src, Node) or src.op != "get_attr":
        return None
    if node.op == "call_function":
        if id(node.target) in _TRANSPOSE_FUNCTIONS:
            pass
        elif node.target is aten.transpose.int or node.target is torch.transpose:
            if {d % 2 for d in node.args[1:3]} != {0, 1}:
                return None
        elif node.target is aten.permute.default:
            if [d % 2 for d in node.args[1]] != [1, 0]:
                return None
        elif node.target is getattr and node.args[1:] in (("T",), ("mT",)):
            pass
        else:
            return None
    elif node.op == "call_method":
        if node.target not in _TRANSPOSE_METHODS or (node.target == "permute" and [d % 2 for d in node.args[1:]] != [1, 0]):
            return None
    else:
        return None
    value = get_attr_path(gm, src.target)
    return src if isinstance(value, torch.Tensor) and value.dim() == 2 else None


def _matmul_site(gm: GraphModule, node: Node) -> CallSite | None:
    """``x @ w.T`` on a parameter ``w`` of shape (out, in): a linear site, with a bias add after it
    (``+ self.bias``, as FalconLinear) counted as part of the layer, so that an output scale
    covers the bias as PEFT's wrapper does."""
    if node.op != "call_function" or id(node.target) not in _MATMUL or len(node.args) < 2:
        return None
    transpose = node.args[1]
    w = _transposed_parameter(gm, transpose)
    if w is None:
        return None
    weight = get_attr_path(gm, w.target)
    out_f, in_f = weight.shape
    owner = _owner(node)
    module, module_type = owner if owner else (w.target.rpartition(".")[0], "")
    layer = "Linear" in module_type.rsplit(".", 1)[-1] and w.target == f"{module}.weight"
    bias = output = None
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and id(users[0].target) in _ADD:
        add = users[0]
        other = add.args[1] if add.args[0] is node else add.args[0]
        expected = f"{w.target[: -len('weight')]}bias" if w.target.endswith("weight") else None
        if isinstance(other, Node) and other.op == "get_attr" and other.target == expected:
            bias, output = other.target, add.name
    return CallSite(
        node=node.name,
        name=module if layer else _param_name(w.target),
        module=module,
        module_type=module_type,
        kind="linear" if layer else "functional_linear",
        in_features=int(in_f),
        out_features=int(out_f),
        weight=w.target,
        bias=bias,
        output=output,
        reads=(transpose.name,),
    )


def _module_site(gm: GraphModule, node: Node) -> CallSite | None:
    mod = gm.get_submodule(node.target)
    cls = type(mod)
    module_type = f"{cls.__module__}.{cls.__qualname__}"
    bias = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
    common = dict(node=node.name, name=node.target, module=node.target, module_type=module_type)
    if isinstance(mod, nn.Linear):
        return CallSite(
            **common, kind="linear", in_features=mod.in_features, out_features=mod.out_features,
            weight=f"{node.target}.weight", bias=bias,
        )
    if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
        return CallSite(
            **common, kind="conv2d" if isinstance(mod, nn.Conv2d) else "conv3d",
            in_features=mod.in_channels, out_features=mod.out_channels,
            weight=f"{node.target}.weight", bias=bias, groups=mod.groups,
        )
    if cls.__name__ == "Conv1D" and hasattr(mod, "weight"):
        return CallSite(
            **common, kind="conv1d", in_features=mod.weight.shape[0],
            out_features=mod.weight.shape[1], weight=f"{node.target}.weight", bias=bias,
        )
    return None


def find_call_sites(gm: GraphModule, config: Any = None, *, model: nn.Module | None = None) -> list[CallSite]:
    """Every linear-like call on a parameter in ``gm``, in graph order.

    With ``config`` (an :class:`~ia3fx.IA3Config`), each site also says whether it is targeted
    and whether it is feedforward, decided by PEFT's rules on the layer names (and on ``model``'s
    module types when given, which ``"all-linear"`` and PEFT's errors need).

    A linear on a quantized weight (torchao's tensor subclasses) that the trace expanded into the
    subclass's kernel is first collapsed back into one ``F.linear`` on that weight, in place
    (the same computation: see :mod:`ia3fx.quantized_sites`); it is then a ``linear`` site.
    """
    from .quantized_sites import collapse_quantized_linears

    collapse_quantized_linears(gm)
    sites: list[CallSite] = []
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.meta.get("ia3fx"):
            continue
        site = None
        if node.op == "call_function":
            site = _function_site(gm, node) or _matmul_site(gm, node)
        elif node.op == "call_module":
            site = _module_site(gm, node)
        if site is None:
            continue
        site = dataclasses.replace(site, call_index=counts[site.name])
        counts[site.name] += 1
        sites.append(site)
    if config is None:
        return sites
    from .targeting import select_targets

    selection = select_targets(config, sites, model=model)
    return selection.annotate(sites)


def _op_name(node: Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def check_targets_scaled(gm: GraphModule, sites: Iterable[CallSite], targets: Iterable[str]) -> None:
    """Refuse targeted layers that run in ``gm`` without a linear call site; warn about targeted
    layers that ``gm`` does not run at all.

    A layer computed by something not recognised as a linear call (a custom kernel, a quantized
    weight's own op) would keep a vector that scales nothing: the adapted model would silently
    equal the base model there, and training would not move it. That is an error, naming the
    layers and the ops they run. A layer the traced inputs never reach is only a warning: other
    inputs may reach it, and PEFT's vector there would get no gradient either.
    """
    with_site = {s.name for s in sites}
    missing = [t for t in targets if t not in with_site]
    if not missing:
        return
    wanted = set(missing)
    ops: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method") or node.meta.get("ia3fx"):
            continue
        found = [fqn for fqn, _ in (node.meta.get("nn_module_stack") or {}).values() if fqn in wanted]
        if node.op == "call_module" and node.target in wanted:
            found.append(node.target)
        for arg in node.all_input_nodes:  # a parameter-path target read by an unrecognised op
            if arg.op == "get_attr" and _param_name(arg.target) in wanted:
                found.append(_param_name(arg.target))
        for layer in found:
            names = ops.setdefault(layer, [])
            op = _op_name(node)
            if op not in names:
                names.append(op)
    if ops:
        shown = sorted(ops)[:5]
        detail = "; ".join(f"{layer} runs {', '.join(ops[layer][:6])}" for layer in shown)
        more = f" (and {len(ops) - len(shown)} more)" if len(ops) > len(shown) else ""
        raise UnscaledTargetError(
            f"{len(ops)} targeted layer(s) are not computed as a linear call (aten.linear / addmm / conv, or a "
            f"matmul with a parameter's transpose), so their (IA)³ vectors would scale nothing: {detail}{more}. "
            "Leave them out of target_modules (exclude_modules=[...]), or make the layer compute F.linear on its weight."
        )
    idle = [t for t in missing if t not in ops]
    shown = ", ".join(idle[:8]) + (", ..." if len(idle) > 8 else "")
    warnings.warn(
        f"{len(idle)} targeted layer(s) are not run by the traced call ({shown}): their vectors do not change "
        "its output and get no gradient from it",
        stacklevel=3,
    )
