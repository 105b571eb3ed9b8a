"""How one (IA)³ vector folds into a layer's weight and bias: PEFT's merge arithmetic, in one place.

The in-memory merge, the graph fold pass and the offline checkpoint merge all call these, so
that their results are bit-identical. The product is taken in the promoted dtype (an fp32 vector
on a bf16 weight multiplies in fp32) and rounded once to the parameter's dtype, as PEFT does.
"""

from __future__ import annotations

import torch

from .sites import CONV_KINDS

__all__ = ["weight_scale", "fold_weight", "fold_bias"]


def weight_scale(kind: str, feedforward: bool, vector: torch.Tensor, weight_shape: torch.Size, groups: int = 1) -> torch.Tensor:
    """``vector`` reshaped to broadcast against the weight along the scaled axis.

    Linear ``(out, in)``: output scales rows, input scales columns. transformers Conv1D (an
    ``addmm`` weight, ``(in, out)``): the other way round. Conv ``(Cout, Cin/groups, *k)``: output
    scales dim 0; input scales dim 1 per group, so each group's filters see their own channels.
    """
    v = vector.reshape(-1)
    spatial = CONV_KINDS.get(kind)
    if spatial:
        if not feedforward:
            return v.reshape((-1,) + (1,) * (spatial + 1))
        cin_g = weight_shape[1]
        if groups == 1:
            return v.reshape((1, -1) + (1,) * spatial)
        cout = weight_shape[0]
        per_group = v.reshape(groups, 1, cin_g).expand(groups, cout // groups, cin_g).reshape(cout, cin_g)
        return per_group.reshape((cout, cin_g) + (1,) * spatial)
    in_out = kind in ("conv1d", "functional_addmm")  # weight stored (in, out)
    if feedforward != in_out:
        return v.reshape(1, -1)  # columns
    return v.reshape(-1, 1)  # rows


def fold_weight(
    weight: torch.Tensor, vector: torch.Tensor, kind: str, feedforward: bool, groups: int = 1
) -> torch.Tensor:
    """The merged weight, in the weight's dtype (a new tensor; the input is not modified)."""
    scale = weight_scale(kind, feedforward, vector, weight.shape, groups)
    return torch.mul(weight, scale.to(weight.device)).to(weight.dtype)


def fold_bias(bias: torch.Tensor | None, vector: torch.Tensor, kind: str, feedforward: bool, weight_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The merged bias: scaled for output (attention-type) sites only, as PEFT.

    Conv biases are cast to the weight's dtype (PEFT's rule), linear biases keep theirs.
    """
    if bias is None or feedforward:
        return bias
    out = torch.mul(bias, vector.reshape(bias.shape).to(bias.device))
    dtype = weight_dtype if (kind in CONV_KINDS and weight_dtype is not None) else bias.dtype
    return out.to(dtype)
