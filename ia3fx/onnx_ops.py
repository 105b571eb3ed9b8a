"""ONNX translations for the operators transformers' models run that torch.onnx cannot translate.

Mixture-of-experts models (Mixtral, Qwen3-MoE, Llama 4) in transformers 5 run their fused experts
in float32 through ``torch.ops.transformers.grouped_mm_fallback``: one matmul per expert over that
expert's rows, which the rows are sorted by. torch.onnx's library has no translation for it, so
their export failed for the base model as for the adapted one. The number of experts is fixed by
the weights, so the op unrolls into one ``MatMul`` per expert. (``aten._grouped_mm``, the bf16
path, has a meta kernel for bf16 only here and no onnxruntime CPU kernel to check against: not
covered.)

:func:`check_translatable` looks at an exported program before the conversion starts and names an
operator of a custom namespace that nothing translates, instead of a failure deep in the
conversion.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import IA3Error

__all__ = ["UntranslatableOpError", "check_translatable", "translation_table"]

# namespaces torch.onnx's own library covers (what it cannot translate there, it reports itself)
_BUILTIN_NAMESPACES = {"aten", "prims", "higher_order", "_operator", "quantized_decomposed"}


class UntranslatableOpError(IA3Error, ValueError):
    """The program runs an operator that has no ONNX translation."""


def _grouped_mm(mat_a: Any, mat_b: Any, offs: Any) -> Any:
    """``out[r] = mat_a[r] @ mat_b[g]`` for the rows ``r`` of group ``g`` (rows sorted by group;
    ``offs[g]`` is where group ``g`` ends): a ``MatMul`` per group on its rows, concatenated."""
    from onnxscript.onnx_opset import opset18 as op

    groups = mat_b.shape[0]
    if not isinstance(groups, int):
        raise UntranslatableOpError("grouped matmul: the number of groups (experts) must be fixed to export it to ONNX")
    axis0 = op.Constant(value_ints=[0])
    ends = op.Split(op.Cast(offs, to=7), axis=0, num_outputs=groups) if groups > 1 else [op.Cast(offs, to=7)]
    weights = op.Split(mat_b, axis=0, num_outputs=groups) if groups > 1 else [mat_b]
    start = op.Constant(value_ints=[0])
    step = op.Constant(value_int=1)
    parts = []
    for g in range(groups):
        rows = op.Range(op.Squeeze(start, axis0), op.Squeeze(ends[g], axis0), step)
        part = op.MatMul(op.Gather(mat_a, rows, axis=0), op.Squeeze(weights[g], axis0))
        parts.append(part)
        start = ends[g]
    return op.Concat(*parts, axis=0)


def translation_table() -> dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export``: the ops above, where they exist."""
    table: dict[Any, Any] = {}
    transformers_ops = _transformers_namespace()
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        table[transformers_ops.grouped_mm_fallback.default] = _grouped_mm
    return table


def _transformers_namespace() -> Any:
    try:
        import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)
    except ImportError:
        return None
    try:
        return torch.ops.transformers
    except (AttributeError, RuntimeError):
        return None


def check_translatable(ep: torch.export.ExportedProgram) -> None:
    """Refuse, naming it, an operator of a custom namespace that :func:`translation_table` lacks."""
    known = set(translation_table())
    missing: dict[str, int] = {}
    for node in ep.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in _BUILTIN_NAMESPACES or target in known:
            continue
        name = f"{target.namespace}::{target._opname}"
        missing[name] = missing.get(name, 0) + 1
    if missing:
        listed = ", ".join(f"{name} (x{count})" for name, count in sorted(missing.items()))
        raise UntranslatableOpError(
            f"cannot export to ONNX: the program runs operators that have no ONNX translation: {listed}. "
            "Export to 'pt2' instead, or register a translation (torch.onnx.export's custom_translation_table)."
        )
