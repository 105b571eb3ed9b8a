"""Complex-valued computation rewritten on real pairs, for exporters that have no complex tensors.

Llama 4's rotary embedding multiplies queries and keys by ``polar(1, angle)`` as complex numbers
(``view_as_complex`` in, ``view_as_real`` out). ONNX has no complex tensors: torch.onnx stops at
the first complex ``unsqueeze`` ("No decompositions registered for the complex-valued input"), for
the base model as for the adapted one. Every complex value becomes here its ``view_as_real`` form
(a real tensor with a trailing dimension of 2), and each op on it the real arithmetic it stands
for; the program's inputs and outputs, all real, are unchanged.

Only the ops such graphs use are rewritten; any other op on a complex value raises
:class:`~ia3fx.onnx_ops.UntranslatableOpError` naming it, before the conversion starts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

__all__ = ["ComplexResult", "complex_to_real"]

aten = torch.ops.aten
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


@dataclass
class ComplexResult:
    """What :func:`complex_to_real` rewrote: the number of complex values, by op."""

    rewritten: dict[str, int]


def _is_complex(value: object) -> bool:
    return isinstance(value, Node) and isinstance(value.meta.get("val"), torch.Tensor) and value.meta["val"].is_complex()


def _dim(dim: int) -> int:
    """A dimension of the complex tensor, counted on its real pair (one more dimension at the end)."""
    return dim if dim >= 0 else dim - 1


class _Rewriter:
    def __init__(self, gm: GraphModule) -> None:
        self.graph = gm.graph
        self.pair: dict[Node, Node] = {}  # complex node -> its real-pair node
        self.counts: dict[str, int] = {}
        placeholders = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        from torch._guards import detect_fake_mode

        self.fake_mode = detect_fake_mode([v for v in placeholders if isinstance(v, torch.Tensor)])

    def op(self, target, *args) -> Node:
        """A new node before the one being rewritten, with its ``val`` computed on fake tensors."""
        node = self.graph.call_function(target, args)
        vals = map_arg(args, lambda a: a.meta["val"])
        with self.fake_mode or contextlib.nullcontext():
            node.meta["val"] = target(*vals)
        return node

    def parts(self, value: object) -> tuple[object, object]:
        """(real, imaginary) of a complex node; (value, 0) of a real one or a number."""
        if _is_complex(value):
            pair = self.pair[value]
            return self.op(aten.select.int, pair, -1, 0), self.op(aten.select.int, pair, -1, 1)
        return value, 0.0

    def pack(self, real: Node, imag: Node) -> Node:
        return self.op(aten.stack.default, [real, imag], -1)

    def rewrite(self, node: Node) -> Node | None:
        """The real-pair node standing for complex ``node``, built before it."""
        target, args = node.target, node.args
        if target is aten.view_as_complex.default:
            return args[0]
        if target is aten.polar.default:
            magnitude, angle = args
            return self.pack(self.op(aten.mul.Tensor, magnitude, self.op(aten.cos.default, angle)),
                             self.op(aten.mul.Tensor, magnitude, self.op(aten.sin.default, angle)))
        if target is aten.mul.Tensor:
            a, b = args
            if not (_is_complex(a) and _is_complex(b)):  # complex x real: scale both parts
                z, r = (a, b) if _is_complex(a) else (b, a)
                if isinstance(r, Node):
                    r = self.op(aten.unsqueeze.default, r, -1)
                return self.op(aten.mul.Tensor, self.pair[z], r)
            (ar, ai), (br, bi) = self.parts(a), self.parts(b)
            real = self.op(aten.sub.Tensor, self.op(aten.mul.Tensor, ar, br), self.op(aten.mul.Tensor, ai, bi))
            imag = self.op(aten.add.Tensor, self.op(aten.mul.Tensor, ar, bi), self.op(aten.mul.Tensor, ai, br))
            return self.pack(real, imag)
        if target is aten.unsqueeze.default:
            return self.op(aten.unsqueeze.default, self.pair[args[0]], _dim(args[1]))
        if target is aten.slice.Tensor:
            rest = list(args[1:]) or [0]
            return self.op(aten.slice.Tensor, self.pair[args[0]], _dim(rest[0]), *rest[1:])
        if target in (aten.to.dtype_layout, aten._to_copy.default, aten.to.dtype, aten.clone.default, aten.alias.default):
            source = self.pair[args[0]]
            want = _REAL_OF[node.meta["val"].dtype]
            if source.meta["val"].dtype == want:
                return source
            return self._cast(source, want)
        return None

    def _cast(self, source: Node, dtype: torch.dtype) -> Node:
        node = self.graph.call_function(aten._to_copy.default, (source,), {"dtype": dtype})
        with self.fake_mode or contextlib.nullcontext():
            node.meta["val"] = source.meta["val"].to(dtype)
        return node


def complex_to_real(gm: GraphModule) -> tuple[GraphModule, ComplexResult]:
    """Rewrite ``gm`` (an aten-level graph with ``val`` metadata) in place: no complex value left."""
    from ..onnx_ops import UntranslatableOpError

    rw = _Rewriter(gm)
    for node in list(rw.graph.nodes):
        if node.op != "call_function":
            continue
        complex_inputs = [a for a in node.all_input_nodes if a in rw.pair or _is_complex(a)]
        if not _is_complex(node) and not complex_inputs:
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if node.target is aten._assert_tensor_metadata.default and complex_inputs:
            rw.graph.erase_node(node)  # it asserts a complex dtype, which is a real pair now
            continue
        if node.target is aten.view_as_real.default:
            node.replace_all_uses_with(rw.pair[node.args[0]])
            rw.graph.erase_node(node)
            rw.counts[name] = rw.counts.get(name, 0) + 1
            continue
        with rw.graph.inserting_before(node):
            pair = rw.rewrite(node) if _is_complex(node) else None
        if pair is None:
            raise UntranslatableOpError(
                f"cannot export to ONNX: {name} on a complex tensor has no real-valued form in ia3fx "
                f"(node {node.name}); export to 'pt2' instead"
            )
        rw.pair[node] = pair
        rw.counts[name] = rw.counts.get(name, 0) + 1
    for node in reversed(list(rw.graph.nodes)):  # the complex nodes, now unused
        if node in rw.pair and not node.users:
            rw.graph.erase_node(node)
    rw.graph.lint()
    gm.recompile()
    return gm, ComplexResult(rw.counts)
