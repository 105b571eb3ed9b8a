"""The offline merge's arithmetic, in numpy: PEFT's fold, bit for bit, without importing torch.

PEFT (and :mod:`ia3fx.scaling`, which the in-memory merge uses) multiplies the weight by the
vector in the promoted dtype and rounds the product once to the weight's dtype. The vector is fp32
on fp16/bf16 weights (PEFT's ``autocast_adapter_dtype``), the weight's dtype otherwise, so the
product is computed in fp32 or fp64: an IEEE multiply, the same bits in numpy as in torch.
What differs is only how values are converted:

* bf16 has no numpy dtype: it is read as ``uint16`` and widened to fp32 by a 16-bit shift (exact),
  and fp32 is narrowed to bf16 by round-to-nearest-even on the bit pattern, with NaN written as
  ``0xFFFF``: the conversion torch's CPU kernels do.
* Narrowing from fp64 goes through fp32 first, as torch's ``Half``/``BFloat16`` conversions do (a
  direct fp64 to fp16 rounding would differ in one value out of two near a tie).

Tests compare every fold against PEFT's ``merge_and_unload`` (``torch.equal``) for fp32, bf16 and
fp16 weights, linear and transformers ``Conv1D`` layers, and these conversions against torch's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COMPUTE", "decode", "encode", "promote", "weight_scale", "fold_block", "fold_bias_values"]

_VIEW = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
COMPUTE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.float32}  # exact values in numpy
CONV_SPATIAL = {"conv2d": 2, "conv3d": 3}  # as ia3fx.sites.CONV_KINDS
BF16_PASS_ELEMENTS = 1 << 16  # values per pass of a bf16 fold: its fp32 scratch (2 x 256 KiB) stays in cache


def decode(raw, dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The values of ``raw`` (bytes of a little-endian ``dtype`` tensor) as a numpy float array:
    a view for F64/F32/F16, a widened fp32 copy for BF16 (exact)."""
    a = np.frombuffer(raw, dtype=_VIEW[dtype])
    if dtype == "BF16":
        a = np.left_shift(a, 16, dtype=np.uint32).view(np.float32)
    return a if shape is None else a.reshape(shape)


def _round_to_bf16(u: np.ndarray, scratch: np.ndarray, out: np.ndarray) -> None:
    """fp32 bit patterns ``u`` to bf16 ones in ``out``: round to nearest, ties to even, as torch's
    CPU kernels (``bits + 0x7FFF + (lowest bit kept)``, whose high 16 bits are the result; NaN
    patterns come out wrong here and are the caller's to replace). ``scratch``: a uint32 array of
    ``u``'s shape. Every step writes into an existing array (``out=``), so one call costs five
    passes over ``u`` and allocates nothing."""
    np.right_shift(u, 16, out=scratch)
    scratch &= 1  # the lowest bit kept: ties go to even
    scratch += 0x7FFF
    scratch += u  # wraps only for NaN patterns
    np.right_shift(scratch, 16, out=out, casting="unsafe")  # the high halves, narrowed to uint16


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 to bf16 bit patterns (:func:`_round_to_bf16`); NaN becomes 0xFFFF (torch's CPU kernels)."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    out = np.empty(u.shape, np.uint16)
    _round_to_bf16(u, np.empty_like(u), out)
    nan = np.isnan(u.view(np.float32))
    if nan.any():
        out[nan] = 0xFFFF
    return out.reshape(x.shape)


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded once to ``dtype`` (via fp32 from fp64, as torch), as an array whose bytes are the tensor's."""
    if dtype == "F64":
        return np.ascontiguousarray(x, dtype=np.float64)
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    if dtype == "BF16":
        return _bf16_bits(x)
    return np.ascontiguousarray(x, dtype=COMPUTE[dtype])


def promote(a: str, b: np.dtype | type) -> type:
    """torch's result dtype of a ``dtype`` tensor times a ``b`` (numpy float) one: bf16 with fp16 is fp32."""
    pair = {COMPUTE[a], np.dtype(b).type}
    if np.float64 in pair:
        return np.float64
    if np.float32 in pair or a == "BF16":
        return np.float32
    return np.float16


def weight_scale(kind: str, feedforward: bool, vector: np.ndarray, shape: tuple[int, ...], groups: int = 1) -> np.ndarray:
    """``vector`` shaped to broadcast against a weight of ``shape`` along the scaled axis
    (:func:`ia3fx.scaling.weight_scale`'s rule): linear ``(out, in)``, Conv1D ``(in, out)``, conv
    ``(Cout, Cin/groups, *k)`` with input scaling per group."""
    v = vector.reshape(-1)
    spatial = CONV_SPATIAL.get(kind)
    if spatial:
        if not feedforward:
            return v.reshape((-1,) + (1,) * (spatial + 1))
        cin_g = shape[1]
        if groups == 1:
            return v.reshape((1, -1) + (1,) * spatial)
        cout = shape[0]
        per_group = np.broadcast_to(v.reshape(groups, 1, cin_g), (groups, cout // groups, cin_g))
        return per_group.reshape((cout, cin_g) + (1,) * spatial)
    in_out = kind in ("conv1d", "functional_addmm")  # weight stored (in, out)
    if feedforward != in_out:
        return v.reshape(1, -1)  # columns
    return v.reshape(-1, 1)  # rows


def _fold_bf16(w16: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bf16 rows ``w16`` (their uint16 patterns) times the fp32 ``scale``, rounded to bf16 into
    ``out`` (which may be ``w16`` itself: each slice is read before it is written).

    numpy has no bf16 loops: each value is widened to fp32 (a 16-bit shift, exact), multiplied and
    rounded back with integer operations, eight passes in all. They run over slices of about
    :data:`BF16_PASS_ELEMENTS` values whose fp32 copies stay in the CPU's cache, each pass writing
    into arrays allocated once (``out=``), instead of over the whole block with a new array per
    step (which sent every pass to memory and back: about 3x slower).
    """
    rows = w16.shape[0] if w16.ndim else 1
    w16 = w16.reshape((rows,) + w16.shape[1:])
    out = out.reshape(w16.shape)
    row = w16[0].size if rows else 0
    step = max(1, BF16_PASS_ELEMENTS // max(1, row))
    n = min(rows, step) * row
    wide, scratch, nan = np.empty(n, np.uint32), np.empty(n, np.uint32), np.empty(n, np.bool_)
    by_rows = scale.ndim == w16.ndim and scale.shape[0] != 1  # the vector runs along dim 0: slice it too
    for r0 in range(0, rows, step):
        r = min(step, rows - r0)
        shape = (r,) + w16.shape[1:]
        u, t, bad = wide[: r * row].reshape(shape), scratch[: r * row].reshape(shape), nan[: r * row].reshape(shape)
        np.left_shift(w16[r0 : r0 + r], 16, out=u, dtype=np.uint32)
        f = u.view(np.float32)
        np.multiply(f, scale[r0 : r0 + r] if by_rows else scale, out=f)
        np.isnan(f, out=bad)
        o = out[r0 : r0 + r]
        _round_to_bf16(u, t, o)
        if bad.any():
            o[bad] = 0xFFFF  # torch's NaN
    return out


def fold_block(raw, src_dtype: str, dtype: str, shape: tuple[int, ...], scale: np.ndarray) -> np.ndarray:
    """Rows of a weight (bytes ``raw`` in ``src_dtype``) times ``scale``, rounded once to ``dtype``.

    ``src_dtype`` differs from ``dtype`` for a replacement tensor of the adapter, which PEFT first
    loads into the base's dtype; the rows' product is taken in the promoted dtype, as torch's.
    A writable ``raw`` (the merge's read buffer) may be overwritten with the result.
    """
    with np.errstate(all="ignore"):  # overflow to inf and NaN are results here, as in torch: no warnings
        if src_dtype == dtype == "BF16" and scale.dtype == np.float32:  # PEFT's fp32 vector on bf16 weights
            w16 = np.frombuffer(raw, np.uint16).reshape(shape)
            return _fold_bf16(w16, scale, w16 if w16.flags.writeable else np.empty(shape, np.uint16))
        w = decode(raw, src_dtype, shape)
        if src_dtype != dtype:
            w = decode(encode(w, dtype), dtype, shape)
        compute = promote(dtype, scale.dtype)
        if w.dtype == compute and w.flags.writeable:  # bf16 widened, or the read buffer: multiply in place
            product = np.multiply(w, scale, out=w)
        else:
            product = np.multiply(w, scale, dtype=compute)
        return encode(product, dtype)


def fold_bias_values(raw, src_dtype: str, dtype: str, vector: np.ndarray, kind: str, weight_dtype: str) -> tuple[np.ndarray, str]:
    """A scaled bias (attention-type layers only) and the dtype it is written in: the bias's own for
    linear layers, the weight's for convs (PEFT's rule, as :func:`ia3fx.scaling.fold_bias`)."""
    b = decode(raw, src_dtype)
    if src_dtype != dtype:
        b = decode(encode(b, dtype), dtype)
    out_dtype = weight_dtype if kind in CONV_SPATIAL else dtype
    with np.errstate(all="ignore"):
        product = np.multiply(b, vector.reshape(b.shape), dtype=promote(dtype, vector.dtype))
        return encode(product, out_dtype), out_dtype
