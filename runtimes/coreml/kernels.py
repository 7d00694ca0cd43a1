"""Op kernels of the Core ML interpreter: arithmetic, activations, reductions, normalisation,
matmul and attention, convolution.

``batch_norm`` appears only in the full-size golden packages (not in the tiny test
models); the real-package parity tests and a kernel test cover it.

Exactly the ops that the exported ESC packages (esc, esc_light, esc_fp, esc_real at every
target, precision, shape mode, compression and image I/O) contain, plus the ones
:mod:`tests.test_coreml` checks against torch: an op no exported graph uses is not kept
here untested. Values arrive as float32 (fp16 rounding is the interpreter's job).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .reader import DTYPES, FLOAT_TYPES, InterpreterError
from .registry import KERNELS, Call, Kernel, as_f32, axis_index, kernel

__all__ = ["CAST_DTYPES", "conv_partial_sums", "einsum_matmul_operands", "einsum_result", "reduction_axes"]

# ``cast``'s dtype strings.
CAST_DTYPES = {
    "fp16": "FLOAT16", "fp32": "FLOAT32", "fp64": "FLOAT64", "int32": "INT32", "int64": "INT64",
    "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "bool": "BOOL",
}


# -- elementwise --------------------------------------------------------------------------
def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def run(c: Call) -> np.ndarray:
        return fn(np.asarray(c("x")), np.asarray(c("y")))
    return run


def _floor_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(np.result_type(x, y), np.integer):
        return np.floor_divide(x, y)
    return np.floor(x / y)


for _name, _fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "floor_div": _floor_div, "equal": np.equal, "greater_equal": np.greater_equal, "less": np.less,
}.items():
    KERNELS[_name] = _binary(_fn)


def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf to float32 accuracy (math.erf is scalar only; no scipy dependency)."""
    x = np.asarray(x, dtype=np.float64)
    # Abramowitz-Stegun 7.1.26 is only ~1e-7 absolute; use the complementary-error-function
    # continued fraction via the W. J. Cody rational approximations instead (double precision).
    ax = np.abs(x)
    out = np.empty_like(ax)
    small = ax < 0.5
    if small.any():
        t = ax[small] ** 2
        p = ((((0.185777706184603153 * t + 3.16112374387056560) * t + 113.864154151050156) * t
              + 377.485237685302021) * t + 3209.37758913846947)
        q = ((((t + 23.6012909523441209) * t + 244.024637934444173) * t + 1282.61652607737228) * t
             + 2844.23683343917062)
        out[small] = ax[small] * p / q
    mid = (~small) & (ax < 4.0)
    if mid.any():
        y = ax[mid]
        p = (((((((2.15311535474403846e-8 * y + 0.564188496988670089) * y + 8.88314979438837594) * y
                 + 66.1191906371416295) * y + 298.635138197400131) * y + 881.952221241769090) * y
              + 1712.04761263407058) * y + 2051.07837782607147) * y + 1230.33935479799725
        q = (((((((y + 15.7449261107098347) * y + 117.693950891312499) * y + 537.181101862009858) * y
                + 1621.38957456669019) * y + 3290.79923573345963) * y + 4362.61909014324716) * y
             + 3439.36767414372164) * y + 1230.33935480374942
        out[mid] = 1.0 - np.exp(-y * y) * p / q
    big = ax >= 4.0
    if big.any():
        y = ax[big]
        z = 1.0 / (y * y)
        p = ((((0.0163153871373020978 * z + 0.305326634961232344) * z + 0.360344899949804439) * z
              + 0.125781726111229246) * z + 0.0160837851487422766) * z + 6.58749161529837803e-4
        q = ((((z + 2.56852019228982242) * z + 1.87295284992346725) * z + 0.527905102951428412) * z
             + 0.0605183413124413191) * z + 0.00233520497626869185
        r = (1.0 / math.sqrt(math.pi) - z * p / q) / y
        out[big] = 1.0 - np.exp(-y * y) * r
    return np.sign(x) * out


def _erf32(x: np.ndarray) -> np.ndarray:
    """erf of a float32 array: scipy's float32 kernel where installed (fast), else :func:`_erf`."""
    try:
        from scipy.special import erf as scipy_erf
    except Exception:  # scipy is optional
        return _erf(x).astype(np.float32)
    return scipy_erf(x)


@kernel("sigmoid")
def _sigmoid(c: Call) -> np.ndarray:
    """Logistic function (ESC-RIB's gate), evaluated in float64 so large |x| neither overflows nor loses bits."""
    x = as_f32(c.x()).astype(np.float64)
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


@kernel("gelu")
def _gelu(c: Call) -> np.ndarray:
    x = as_f32(c.x())
    mode = c.str("mode", "EXACT") if c.has("mode") else "EXACT"
    if mode == "EXACT":
        return (0.5 * x * (1.0 + _erf32(x * np.float32(1.0 / math.sqrt(2.0))))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    raise InterpreterError(f"gelu '{c.op.name}': unknown mode {mode!r}")


@kernel("clip")
def _clip(c: Call) -> np.ndarray:
    return np.clip(c.x(), c.float("alpha"), c.float("beta"))


@kernel("leaky_relu")
def _leaky_relu(c: Call) -> np.ndarray:
    x = c.x()
    return np.where(x >= 0, x, x * c.float("alpha", 0.01)).astype(x.dtype)


@kernel("select")
def _select(c: Call) -> np.ndarray:
    return np.where(np.asarray(c("cond")).astype(bool), c("a"), c("b"))


@kernel("cast")
def _cast(c: Call) -> np.ndarray:
    target = CAST_DTYPES.get(c.str("dtype"))
    if target is None:
        raise InterpreterError(f"cast '{c.op.name}': unknown dtype {c.str('dtype')!r}")
    x = c.x()
    if target in FLOAT_TYPES:
        return x.astype(np.float32)  # fp16 rounding is applied with the output's declared type
    if target == "BOOL":
        return x.astype(bool)
    if x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(DTYPES[target][0])


# -- reductions -----------------------------------------------------------------------------
def _mean(x: np.ndarray, axis: tuple[int, ...] | None, keepdims: bool) -> np.ndarray:
    """Float means accumulate in float64 (then back to the input's type), like Core ML's fp32."""
    if x.dtype.kind != "f":
        return np.mean(x, axis=axis, keepdims=keepdims)
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=np.float64).astype(x.dtype)


@kernel("reduce_mean")
def _reduce_mean(c: Call) -> np.ndarray:
    x = c.x()
    return _mean(x, reduction_axes(c, x.ndim), c.bool("keep_dims", False))


@kernel("reduce_sum")
def _reduce_sum(c: Call) -> np.ndarray:
    x = c.x()
    return np.sum(x, axis=reduction_axes(c, x.ndim), keepdims=c.bool("keep_dims", False))


def reduction_axes(c: Call, rank: int) -> tuple[int, ...] | None:
    axes = c.ints("axes")
    return None if axes is None else tuple(axis_index(a, rank) for a in axes)


# -- normalisation / activation over axes --------------------------------------------------
@kernel("softmax")
def _softmax(c: Call) -> np.ndarray:
    x = as_f32(c.x())
    axis = c.int("axis", -1)
    e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


@kernel("layer_norm")
def _layer_norm(c: Call) -> np.ndarray:
    x = as_f32(c.x())
    axes = c.ints("axes")
    axes_t = tuple(range(x.ndim)) if axes is None else tuple(sorted(axis_index(a, x.ndim) for a in axes))
    mean = x.mean(axis=axes_t, keepdims=True, dtype=np.float64)
    var = ((x - mean) ** 2).mean(axis=axes_t, keepdims=True)
    y = ((x - mean) / np.sqrt(var + c.float("epsilon", 1e-5))).astype(np.float32)
    bshape = [x.shape[i] if i in axes_t else 1 for i in range(x.ndim)]
    if c.has("gamma") and c("gamma") is not None:
        y = y * np.asarray(c("gamma")).reshape(bshape)
    if c.has("beta") and c("beta") is not None:
        y = y + np.asarray(c("beta")).reshape(bshape)
    return y


def _channel_shape(v: Any, rank: int) -> np.ndarray:
    return np.asarray(v).reshape((1, -1) + (1,) * (rank - 2))


@kernel("batch_norm")
def _batch_norm(c: Call) -> np.ndarray:
    x = as_f32(c.x())
    mean = _channel_shape(c("mean"), x.ndim)
    var = _channel_shape(c("variance"), x.ndim)
    y = (x - mean) / np.sqrt(var + c.float("epsilon", 1e-5))
    if c("gamma") is not None:
        y = y * _channel_shape(c("gamma"), x.ndim)
    if c("beta") is not None:
        y = y + _channel_shape(c("beta"), x.ndim)
    return y


# -- linear algebra ----------------------------------------------------------------------------
@kernel("matmul")
def _matmul(c: Call) -> np.ndarray:
    x, y = as_f32(c("x")), as_f32(c("y"))
    if c.bool("transpose_x") and x.ndim >= 2:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2))
    if c.bool("transpose_y") and y.ndim >= 2:
        y = np.ascontiguousarray(np.swapaxes(y, -1, -2))
    return np.matmul(x, y)


def einsum_matmul_operands(c: Call) -> tuple[np.ndarray, np.ndarray, int]:
    """MIL ``einsum``'s one form as a batched matmul: ``(x', y', rank)`` with ``x' @ y'`` the result.

    MIL defines ``einsum`` for ``nchw,nwhu->nchu`` (rank 4) and ``chw,whu->chu`` (rank 3)
    only, under any letters: x's last axis contracts with y's axis -3, axis -2 is a batch
    axis (broadcast where 1). Here x is moved to (..., H, C, W1) and y to (..., H, W1, W2);
    the caller multiplies and moves the result back with :func:`einsum_result`.
    """
    equation = c.str("equation").replace(" ", "")
    inputs, _, output = equation.partition("->")
    a, _, b = inputs.partition(",")
    rank = len(a)
    expected = (a[:-1] + b[-1]) if rank in (3, 4) else None
    pattern_ok = (expected == output and len(b) == rank and b[-3] == a[-1] and b[-2] == a[-2]
                  and (rank == 3 or b[0] == a[0]))
    if not pattern_ok:
        raise InterpreterError(f"einsum '{c.op.name}': equation {equation!r} is not MIL's nchw,nwhu->nchu form")
    values = c.list("values")
    x, y = as_f32(values[0]), as_f32(values[1])
    return np.swapaxes(x, -3, -2), np.swapaxes(y, -3, -2), rank


def einsum_result(product: np.ndarray) -> np.ndarray:
    """(..., H, C, W2) -> (..., C, H, W2): the einsum's output layout."""
    return np.ascontiguousarray(np.swapaxes(product, -3, -2))


@kernel("einsum")
def _einsum(c: Call) -> np.ndarray:
    x, y, _ = einsum_matmul_operands(c)
    return einsum_result(np.matmul(x, y))


@kernel("scaled_dot_product_attention")
def _sdpa(c: Call) -> np.ndarray:
    q, k, v = as_f32(c("query")), as_f32(c("key")), as_f32(c("value"))
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    mask = c("attn_mask")
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q = np.broadcast_to(q, batch + q.shape[-2:]).reshape((-1,) + q.shape[-2:])
    kt = np.swapaxes(np.broadcast_to(k, batch + k.shape[-2:]), -1, -2)
    kt = np.ascontiguousarray(kt).reshape((-1, k.shape[-1], k.shape[-2]))
    v = np.ascontiguousarray(np.broadcast_to(v, batch + v.shape[-2:])).reshape((-1,) + v.shape[-2:])
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            mask = np.where(mask, np.float32(0), np.float32(-np.inf))
        scores_shape = (q.shape[-2], kt.shape[-1])
        mask = np.broadcast_to(mask.astype(np.float32), batch + scores_shape).reshape((-1,) + scores_shape)
    out = np.empty((q.shape[0], q.shape[1], v.shape[-1]), np.float32)
    scores = np.empty((q.shape[1], kt.shape[-1]), np.float32)
    # One (L, S) score matrix at a time: it stays in cache, unlike a (B*heads, L, S) tensor.
    for b in range(q.shape[0]):
        np.matmul(q[b], kt[b], out=scores)
        scores *= scale
        if mask is not None:
            scores += mask[b]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        np.matmul(scores, v[b], out=out[b])
    return out.reshape(batch + out.shape[-2:])


# -- convolution -------------------------------------------------------------------------------
def _conv_padding(c: Call, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
                  dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = c.str("pad_type", "valid") if c.has("pad_type") else "valid"
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = c.ints("pad") or [0] * (2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise InterpreterError(f"conv '{c.op.name}': unknown pad_type {pad_type!r}")


def conv_partial_sums(c: Call, block: int | None = None) -> tuple[tuple[int, ...], Iterator[np.ndarray]]:
    """A 2-D convolution (no bias) as the output shape and a stream of partial sums that add up to it.

    Why a stream: the fp32 kernel adds the partial sums in float32, the fp16 kernel of
    :mod:`.fp16_kernels` in an fp16 accumulator; one walk over the taps serves both.
    ``block`` caps how many products one partial sum holds (None: a whole row of taps).
    """
    x, w = as_f32(c.x()), as_f32(c("weight"))
    if x.ndim != 4:  # the exporters write 2-D convolutions only
        raise InterpreterError(f"conv '{c.op.name}': rank-{x.ndim} input is not supported (2-D convolutions only)")
    strides = c.ints("strides") or [1, 1]
    dilations = c.ints("dilations") or [1, 1]
    groups = c.int("groups", 1) if c.has("groups") else 1
    ksize = tuple(w.shape[2:])
    pads = _conv_padding(c, tuple(x.shape[2:]), ksize, strides, dilations)
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0)] + pads)
    batch, cin = x.shape[:2]
    cout = w.shape[0]
    if cin != w.shape[1] * groups:
        raise InterpreterError(
            f"conv '{c.op.name}': input has {cin} channels, weight {tuple(w.shape)} with groups={groups} expects "
            f"{w.shape[1] * groups}")
    sp = x.shape[2:]
    oh, ow = ((s - (k - 1) * d - 1) // st + 1 for s, k, d, st in zip(sp, ksize, dilations, strides))
    kh, kw = ksize
    sh, sw = strides
    dh, dw = dilations
    cin_g, cout_g = cin // groups, cout // groups
    shape = (batch, cout, oh, ow)

    def patch(a: np.ndarray, i: int, j: int) -> np.ndarray:
        return a[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]

    def depthwise() -> Iterator[np.ndarray]:
        for i in range(kh):
            for j in range(kw):
                yield patch(x, i, j) * w[None, :, 0, i, j, None, None]

    def dense() -> Iterator[np.ndarray]:
        # One matmul per row of taps: (Cout, Cin*kw) @ (Cin*kw, oh*ow), with contiguous operands
        # (numpy's matmul leaves BLAS for strided views).
        wt = np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(kh, cout, cin * kw)
        step = block or cin * kw
        for i in range(kh):
            rows = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh]
            cols = np.stack([rows[..., j * dw: j * dw + (ow - 1) * sw + 1: sw] for j in range(kw)], axis=2)
            cols = cols.reshape(batch, cin * kw, oh * ow)
            for k in range(0, cin * kw, step):
                yield np.matmul(wt[i][:, k:k + step], np.ascontiguousarray(cols[:, k:k + step])).reshape(shape)

    def grouped() -> Iterator[np.ndarray]:
        wg = np.ascontiguousarray(w.reshape(groups, cout_g, cin_g, kh, kw).transpose(3, 4, 0, 1, 2))
        step = block or cin_g
        for i in range(kh):
            for j in range(kw):
                p = np.ascontiguousarray(patch(x, i, j)).reshape(batch, groups, cin_g, oh * ow)
                for k in range(0, cin_g, step):
                    yield np.matmul(wg[i, j][:, :, k:k + step], p[:, :, k:k + step]).reshape(shape)

    if cin_g == 1 and cout_g == 1:
        return shape, depthwise()
    return shape, dense() if groups == 1 else grouped()


@kernel("conv")
def _conv(c: Call) -> np.ndarray:
    shape, partials = conv_partial_sums(c)
    out = np.zeros(shape, dtype=np.float32)
    for part in partials:
        out += part
    bias = c("bias")
    if bias is not None:
        out += np.asarray(bias, dtype=np.float32)[None, :, None, None]
    return out
