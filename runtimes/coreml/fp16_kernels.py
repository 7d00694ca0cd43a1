"""fp16 arithmetic *inside* operations: the kernels of the interpreter's ``"ane"`` mode.

Why: the ``"fp16"`` mode rounds every op's result to float16 but computes inside each op
in float32/float64, so an overflow or an accumulation error that happens *within* an op
never shows: LayerNorm's squared deviations (fused into one ``layer_norm`` op by
coremltools), the sums of a 13x13 convolution, the global average pool of the dynamic
kernel estimator. The Neural Engine computes in fp16 throughout, so these kernels do too:

* every intermediate value is rounded to fp16 (:func:`round16`), so any value above 65504
  becomes an infinity exactly where the device would overflow;
* sums (convolution, matmul and einsum contractions, ``reduce_sum``/``reduce_mean``, the mean and
  variance of ``layer_norm``, the softmax denominator) use an **fp16 accumulator**: the
  terms are added in blocks of :data:`ACCUMULATION_BLOCK` (each block's products summed
  exactly enough in float32: a product of two fp16 values is exact in float32) and the
  running sum is rounded to fp16 after every block.

Apple does not document the Neural Engine's accumulator; an fp16 accumulator rounded every
32 terms is the pessimistic reading (a wider accumulator only does better), so a package
that passes here has margin. Means are sums divided by the count (not pre-scaled terms),
again the case that overflows first. Element-wise ops need no kernel here: computing them
in float32 and rounding the result gives the correctly rounded fp16 result (float32 has
more than 2 x 11 + 2 bits), which the interpreter's result rounding already does.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from .kernels import conv_partial_sums, einsum_matmul_operands, einsum_result, reduction_axes
from .registry import Call, Kernel, as_f32, axis_index

__all__ = ["ACCUMULATION_BLOCK", "FP16_KERNELS", "matmul16", "round16", "sum16"]

#: Terms added per fp16 rounding of a running sum (see the module docstring).
ACCUMULATION_BLOCK = 32

FP16_KERNELS: dict[str, Kernel] = {}


def _fp16_kernel(*names: str):
    def register(fn: Kernel) -> Kernel:
        for name in names:
            FP16_KERNELS[name] = fn
        return fn
    return register


def round16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest float16 (ties to even), kept as float32.

    Bit-exact with ``a.astype(np.float16).astype(np.float32)`` (overflow to inf, fp16
    subnormals, NaN included) and several times faster: the float32 mantissa is rounded
    to 10 bits with integer arithmetic; values below fp16's normal range (2**-14) are
    rounded to multiples of 2**-24, magnitudes above 65504 become infinities.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    r = np.empty_like(a)
    rv = r.view(np.uint32)
    np.right_shift(u, np.uint32(13), out=rv)
    np.bitwise_and(rv, np.uint32(1), out=rv)
    np.add(rv, np.uint32(0x0FFF), out=rv)
    np.add(rv, u, out=rv)
    np.bitwise_and(rv, np.uint32(0xFFFFE000), out=rv)
    if a.size == 0:
        return r
    mag = np.bitwise_and(u, np.uint32(0x7FFFFFFF))
    if mag.min() < np.uint32(0x38800000):  # |a| < 2**-14: fp16 subnormal range
        small = mag < np.uint32(0x38800000)
        r[small] = np.round(a[small] * np.float32(16777216.0)) / np.float32(16777216.0)
    np.bitwise_and(rv, np.uint32(0x7FFFFFFF), out=mag)
    if mag.max() > np.uint32(0x477FE000):  # above 65504 after rounding (NaN excluded below)
        big = (mag > np.uint32(0x477FE000)) & (mag <= np.uint32(0x7F800000))
        r[big] = np.copysign(np.float32(np.inf), a[big])
    return r


def accumulate16(partials: Iterator[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Sum partial sums in an fp16 accumulator: ``acc = fp16(acc + fp16(partial))``."""
    acc = np.zeros(shape, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for part in partials:
            acc = round16(acc + round16(part))
    return acc


def sum16(x: np.ndarray, axes: tuple[int, ...] | None, keepdims: bool = False) -> np.ndarray:
    """``x.sum(axes)`` with an fp16 accumulator (blocks of :data:`ACCUMULATION_BLOCK` terms)."""
    x = as_f32(x)
    axes = tuple(range(x.ndim)) if axes is None else tuple(sorted(axes))
    kept = [d for d in range(x.ndim) if d not in axes]
    flat = np.transpose(x, kept + list(axes)).reshape([x.shape[d] for d in kept] + [-1])
    n = flat.shape[-1]
    out = accumulate16((flat[..., k:k + ACCUMULATION_BLOCK].sum(-1) for k in range(0, n, ACCUMULATION_BLOCK)),
                       flat.shape[:-1])
    if keepdims:
        out = out.reshape([1 if d in axes else x.shape[d] for d in range(x.ndim)])
    return out


def mean16(x: np.ndarray, axes: tuple[int, ...] | None, keepdims: bool = False) -> np.ndarray:
    """fp16 mean: the fp16-accumulated sum divided by the count, rounded."""
    axes_t = tuple(range(x.ndim)) if axes is None else axes
    count = int(np.prod([x.shape[a] for a in axes_t])) if axes_t else 1
    with np.errstate(over="ignore", invalid="ignore"):
        return round16(sum16(x, axes, keepdims) / np.float32(count))


def matmul16(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y`` with an fp16 accumulator over the contracted axis."""
    k = x.shape[-1]
    shape = np.broadcast_shapes(x.shape[:-2], y.shape[:-2]) + (x.shape[-2], y.shape[-1])
    return accumulate16((np.matmul(x[..., i:i + ACCUMULATION_BLOCK], y[..., i:i + ACCUMULATION_BLOCK, :])
                         for i in range(0, k, ACCUMULATION_BLOCK)), shape)


@_fp16_kernel("reduce_sum")
def _reduce_sum16(c: Call) -> np.ndarray:
    x = c.x()
    return sum16(x, reduction_axes(c, x.ndim), c.bool("keep_dims", False))


@_fp16_kernel("reduce_mean")
def _reduce_mean16(c: Call) -> np.ndarray:
    x = c.x()
    return mean16(x, reduction_axes(c, x.ndim), c.bool("keep_dims", False))


def softmax16(x: np.ndarray, axis: int) -> np.ndarray:
    """Softmax with fp16 exponentials and an fp16-accumulated denominator."""
    with np.errstate(over="ignore", invalid="ignore"):
        e = round16(np.exp(round16(x - x.max(axis=axis, keepdims=True))))
        return round16(e / sum16(e, (axis_index(axis, x.ndim),), keepdims=True))


@_fp16_kernel("softmax")
def _softmax16(c: Call) -> np.ndarray:
    return softmax16(as_f32(c.x()), c.int("axis", -1))


@_fp16_kernel("layer_norm")
def _layer_norm16(c: Call) -> np.ndarray:
    """LayerNorm step by step in fp16: mean, deviations, their squares (where large inputs
    overflow), the mean of the squares, ``1 / sqrt(var + eps)``, scale and shift."""
    x = as_f32(c.x())
    axes = c.ints("axes")
    axes_t = tuple(range(x.ndim)) if axes is None else tuple(sorted(axis_index(a, x.ndim) for a in axes))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        centred = round16(x - mean16(x, axes_t, keepdims=True))
        var = mean16(round16(centred * centred), axes_t, keepdims=True)
        inv = round16(np.float32(1.0) / np.sqrt(round16(var + np.float32(c.float("epsilon", 1e-5)))))
        y = round16(centred * inv)
        bshape = [x.shape[i] if i in axes_t else 1 for i in range(x.ndim)]
        if c.has("gamma") and c("gamma") is not None:
            y = round16(y * np.asarray(c("gamma")).reshape(bshape))
        if c.has("beta") and c("beta") is not None:
            y = round16(y + np.asarray(c("beta")).reshape(bshape))
    return y


@_fp16_kernel("matmul")
def _matmul16(c: Call) -> np.ndarray:
    x, y = as_f32(c("x")), as_f32(c("y"))
    if c.bool("transpose_x") and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if c.bool("transpose_y") and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return matmul16(np.ascontiguousarray(x), np.ascontiguousarray(y))


@_fp16_kernel("einsum")
def _einsum16(c: Call) -> np.ndarray:
    x, y, _ = einsum_matmul_operands(c)
    return einsum_result(matmul16(np.ascontiguousarray(x), np.ascontiguousarray(y)))


@_fp16_kernel("scaled_dot_product_attention")
def _sdpa16(c: Call) -> np.ndarray:
    """Attention as the three fp16 steps it is: scores (fp16 accumulator), softmax, weighted sum."""
    q, k, v = as_f32(c("query")), as_f32(c("key")), as_f32(c("value"))
    scale = round16(np.float32(1.0 / math.sqrt(q.shape[-1])))
    scores = round16(matmul16(q, np.swapaxes(k, -1, -2)) * scale)
    mask = c("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            mask = np.where(mask, np.float32(0), np.float32(-np.inf))
        with np.errstate(over="ignore", invalid="ignore"):
            scores = round16(scores + mask.astype(np.float32))
    return matmul16(softmax16(scores, -1), v)


@_fp16_kernel("conv")
def _conv16(c: Call) -> np.ndarray:
    shape, partials = conv_partial_sums(c, block=ACCUMULATION_BLOCK)
    out = accumulate16(partials, shape)
    bias = c("bias")
    if bias is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            out = round16(out + np.asarray(bias, dtype=np.float32)[None, :, None, None])
    return out
