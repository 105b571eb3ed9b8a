"""Folding (IA)³ vectors into quantized weights, where the fold adds no new rounding.

A quantized linear computes ``y = dequant(q) x`` with ``dequant(q)[i, j] = s[i, g(j)] * q[i, j]``:
scales per output row (and per group of inputs). So

* an **output** (attention-type) vector ``l`` folds into the row scales, ``s[i, :] * l[i]``, and
  the bias, ``b * l``: the quantized data ``q`` is untouched, there is no new quantization
  rounding, only the rounding of one product per scale (as in a float merge);
* an **input** (feedforward) vector scales *columns*, which per-row scales cannot express. torchao's
  ``Int8Tensor`` has a place for exactly that, ``act_pre_scale`` (its kernel multiplies the
  activation by it first, as SmoothQuant and AWQ use it), so there the fold is exact too: the same
  multiply, done inside the kernel. Anywhere else (bitsandbytes, half-precision activations,
  other subclasses) an input vector does not fold: the merge *keeps* it as a multiply in front of
  the layer, or, with ``requantize=True``, dequantizes, scales and quantizes again, a new rounding
  whose effect on the outputs is reported.

:func:`fold_quantized` decides per layer and computes the new tensors; nothing is assigned here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .quantized_sites import is_quantized_weight

__all__ = [
    "KeptScale", "QuantizedFold", "QuantizedMergeReport", "fold_quantized", "get_data", "is_quantized_weight", "same_data",
    "set_data",
]


@dataclass
class QuantizedFold:
    """How one vector goes into one quantized layer: ``"folded"`` (``weight``/``bias`` are the new
    tensors), ``"kept"`` (a multiply stays; ``why`` says why) or ``"requantized"``."""

    how: str
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    why: str = ""


@dataclass
class QuantizedMergeReport:
    """What a merge into a quantized base did, per layer (layer names as the config matched them).

    ``folded``: into the quantization scales (or torchao's ``act_pre_scale``), no new rounding;
    ``kept``: ``{layer: why}``, still applied as a multiply (in the merged graph, or by a forward
    pre-hook on the layer after ``merge_and_unload``); ``requantized``: layers quantized again, and
    ``requantize_error``, the largest absolute difference of the outputs against the unmerged
    model on the example inputs.
    """

    folded: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    requantized: list[str] = field(default_factory=list)
    requantize_error: float | None = None

    def __str__(self) -> str:
        lines = [f"folded exactly ({len(self.folded)}): {', '.join(self.folded) or '-'}"]
        lines.append(f"kept as a multiply ({len(self.kept)}): {', '.join(self.kept) or '-'}")
        lines.extend(f"  {layer}: {why}" for layer, why in self.kept.items())
        if self.requantized:
            lines.append(f"requantized ({len(self.requantized)}): {', '.join(self.requantized)}; "
                         f"max |output - unmerged output| = {self.requantize_error:.3g}")
        return "\n".join(lines)


def _inner(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    names, ctx = weight.__tensor_flatten__()
    return {n: getattr(weight, n) for n in names}, ctx


def _rebuilt(weight: torch.Tensor, **replace: torch.Tensor) -> torch.Tensor:
    tensors, ctx = _inner(weight)
    tensors.update(replace)
    return type(weight).__tensor_unflatten__(tensors, ctx, weight.shape, weight.stride())


def _row_scales(weight: torch.Tensor) -> torch.Tensor | None:
    """The per-row (per-row-and-group) scales of a torchao weight, if that is what it has."""
    if not hasattr(weight, "__tensor_flatten__"):
        return None
    tensors, _ = _inner(weight)
    scale = tensors.get("scale")
    if scale is None or "qdata" not in tensors or weight.dim() != 2:
        return None
    if scale.dim() == 2 and scale.shape[0] == weight.shape[0]:
        return scale
    return None


def _why_output_kept(weight: torch.Tensor) -> str:
    if type(weight).__module__.startswith("bitsandbytes"):
        return f"bitsandbytes {type(weight).__name__} scales are not folded by ia3fx"
    return f"{type(weight).__name__} has no per-output-row scales to fold into"


def fold_quantized(
    weight: torch.Tensor, bias: torch.Tensor | None, vector: torch.Tensor, feedforward: bool, *, requantize: bool = False
) -> QuantizedFold:
    """The fold of ``vector`` into a quantized linear weight (and its bias, for an output vector)."""
    v = vector.detach().reshape(-1)
    if not feedforward:
        scale = _row_scales(weight)
        if scale is not None:
            new_scale = (scale * v.to(scale.dtype).reshape(-1, 1)).to(scale.dtype)
            new_bias = None if bias is None else torch.mul(bias, v.to(bias.device)).to(bias.dtype)
            return QuantizedFold("folded", _rebuilt(weight, scale=new_scale), new_bias)
        why = _why_output_kept(weight)
    else:
        names = getattr(type(weight), "optional_tensor_data_names", ())
        if "act_pre_scale" in names and weight.dtype == v.dtype:
            pre = getattr(weight, "act_pre_scale", None)
            new_pre = v.clone() if pre is None else (pre * v).to(pre.dtype)
            return QuantizedFold("folded", _rebuilt(weight, act_pre_scale=new_pre), bias)
        if "act_pre_scale" in names:
            why = f"an fp32 vector on {weight.dtype} activations rounds differently inside the kernel"
        else:
            why = f"an input scale does not fold into {type(weight).__name__}'s per-row scales"
    if requantize:
        return _requantized(weight, bias, v, feedforward, why)
    return QuantizedFold("kept", why=why)


def _requantized(
    weight: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor, feedforward: bool, why: str
) -> QuantizedFold:
    """Dequantize, scale, quantize again with the same scheme (block size, activation quantization)."""
    from .scaling import fold_bias, fold_weight

    cls = type(weight)
    if cls.__name__ not in ("Int8Tensor", "IntxUnpackedToInt8Tensor") or not hasattr(cls, "from_hp"):
        raise ValueError(
            f"requantize=True cannot quantize a {cls.__module__}.{cls.__name__} weight again ({why}): ia3fx "
            "requantizes torchao's Int8Tensor and IntxUnpackedToInt8Tensor. Merge without requantize (the vector "
            "stays a multiply), or dequantize the model first"
        )
    dense = weight.dequantize().to(torch.float32)
    scaled = fold_weight(dense, v.to(torch.float32), "linear", feedforward).to(weight.dtype)
    if cls.__name__ == "Int8Tensor":
        from torchao.quantization.granularity import PerRow, PerTensor

        per_row = list(weight.block_size) == [1, weight.shape[1]]
        new = cls.from_hp(
            scaled, PerRow() if per_row else PerTensor(), act_quant_kwargs=weight.act_quant_kwargs,
            act_pre_scale=weight.act_pre_scale,
        )
    else:
        from torchao.quantization.quant_primitives import MappingType

        symmetric = weight.zero_point is None or not bool(weight.zero_point.any())
        new = cls.from_hp(
            scaled, tuple(weight.block_size), weight.target_dtype,
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            activation_quantization=weight.activation_quantization,
        )
    return QuantizedFold("requantized", new, fold_bias(bias, v, "linear", feedforward), why=why)


class KeptScale:
    """A forward hook (pre-hook for an input vector) that keeps a vector on a layer after
    ``merge_and_unload`` where it did not fold: the adapted model's arithmetic, product in the
    vector's dtype rounded once to the activation's. The vector is a detached copy."""

    def __init__(self, vector: torch.Tensor, placement: str) -> None:
        self.vector = vector.detach().reshape(-1).clone()
        self.placement = placement

    def __call__(self, module: nn.Module, inputs: tuple, *output: torch.Tensor):
        x = output[0] if output else inputs[0]
        v = self.vector.to(x.device)
        y = x * v if x.dtype == v.dtype else (x.to(v.dtype) * v).to(x.dtype)
        return y if output else (y, *inputs[1:])

    def install(self, module: nn.Module) -> None:
        if self.placement == "input":
            module.register_forward_pre_hook(self)
        else:
            module.register_forward_hook(self)


# --- putting a merged quantized weight in place ----------------------------------------------------
# A torchao weight keeps its data in Python attributes of the wrapper (``qdata``, ``scale``, ...),
# which ``param.data = new`` does not touch. These swap those attributes instead, on the same
# parameter object (hooks, FSDP and the block graphs keep reading the parameter they know).
def get_data(param: torch.Tensor) -> torch.Tensor:
    """``param.data``, or for a wrapper subclass a new wrapper on the same inner tensors."""
    if is_traceable_wrapper_subclass(param):
        return _rebuilt(param)
    return param.data


def set_data(param: torch.Tensor, data: torch.Tensor) -> None:
    """``param.data = data``; for a wrapper subclass, its inner tensors become ``data``'s."""
    if is_traceable_wrapper_subclass(param):
        names = getattr(type(param), "tensor_data_names", []) + getattr(type(param), "optional_tensor_data_names", [])
        for name in names or _inner(data)[0]:
            setattr(param, name, getattr(data, name, None))
        return
    param.data = data


def same_data(param: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether ``param`` holds ``data`` now (the same storage, or the same inner tensors)."""
    if is_traceable_wrapper_subclass(param):
        mine, theirs = _inner(param)[0], _inner(data)[0]
        return mine.keys() == theirs.keys() and all(mine[k] is theirs[k] for k in mine)
    return param.data.data_ptr() == data.data_ptr()
