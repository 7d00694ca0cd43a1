"""Op kernels of the Core ML interpreter that move values without arithmetic: shape,
layout, indexing, padding, resampling (see :mod:`.kernels` for which ops are kept and why).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reader import InterpreterError
from .registry import Call, axis_index, kernel

@kernel("reshape")
def _reshape(c: Call) -> np.ndarray:
    x = np.asarray(c("x"))
    shape = c.ints("shape")
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def _transpose(c: Call) -> np.ndarray:
    return np.transpose(c.x(), c.ints("perm"))


@kernel("expand_dims")
def _expand_dims(c: Call) -> np.ndarray:
    x = np.asarray(c("x"))
    axes = c.ints("axes")
    out_rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(axis_index(a, out_rank) for a in axes)))


@kernel("tile")
def _tile(c: Call) -> np.ndarray:
    return np.tile(np.asarray(c("x")), c.ints("reps"))


@kernel("concat")
def _concat(c: Call) -> np.ndarray:
    values = [np.asarray(v) for v in c.list("values")]
    if any(v.ndim == 0 for v in values):  # scalars concatenate as 1-element vectors (shape math)
        values = [np.atleast_1d(v) for v in values]
    axis = axis_index(c.int("axis"), values[0].ndim)
    if c.bool("interleave", False):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@kernel("split")
def _split(c: Call) -> list[np.ndarray]:
    x = np.asarray(c("x"))
    axis = axis_index(c.int("axis"), x.ndim)
    sizes = c.ints("split_sizes")
    if sizes is None:
        n = c.int("num_splits")
        sizes = [x.shape[axis] // n] * n
    bounds = np.cumsum(sizes)[:-1]
    return np.split(x, bounds, axis=axis)


@kernel("slice_by_index")
def _slice_by_index(c: Call) -> np.ndarray:
    x = np.asarray(c("x"))
    rank = x.ndim
    begin = c.ints("begin")
    end = c.ints("end")
    stride = c.ints("stride") or [1] * rank
    bmask = [bool(b) for b in np.asarray(c("begin_mask", [False] * rank)).reshape(-1)]
    emask = [bool(b) for b in np.asarray(c("end_mask", [False] * rank)).reshape(-1)]
    smask = [bool(b) for b in np.asarray(c("squeeze_mask", [False] * rank)).reshape(-1)]
    index: list[Any] = []
    for i in range(rank):
        if smask[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return x[tuple(index)]


@kernel("gather")
def _gather(c: Call) -> np.ndarray:
    x = np.asarray(c("x"))
    indices = np.asarray(c("indices")).astype(np.int64)
    axis = axis_index(c.int("axis", 0), x.ndim)
    batch_dims = c.int("batch_dims", 0) if c.has("batch_dims") else 0
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    if indices.size and (indices.min() < 0 or indices.max() >= x.shape[axis]):
        raise InterpreterError(f"gather '{c.op.name}': index out of range for axis size {x.shape[axis]}")
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    # Batched gather: loop over the shared leading dims.
    lead = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    ids = indices.reshape((-1,) + indices.shape[batch_dims:])
    outs = [np.take(xs[b], ids[b], axis=axis - batch_dims) for b in range(xs.shape[0])]
    return np.stack(outs).reshape(lead + outs[0].shape)


@kernel("pad")
def _pad(c: Call) -> np.ndarray:
    x = np.asarray(c("x"))
    pad = c.ints("pad")
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = c.str("mode", "constant") if c.has("mode") else "constant"
    if mode == "constant":
        return np.pad(x, widths, constant_values=c.float("constant_val", 0.0) if c.has("constant_val") else 0.0)
    if mode == "reflect":
        for axis, (before, after) in enumerate(widths):
            if max(before, after) >= x.shape[axis] and (before or after):
                raise InterpreterError(
                    f"pad '{c.op.name}': reflect padding of {max(before, after)} on an axis of size "
                    f"{x.shape[axis]} (Core ML needs pad < size)")
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    if mode == "symmetric":
        return np.pad(x, widths, mode="symmetric")
    raise InterpreterError(f"pad '{c.op.name}': unknown mode {mode!r}")


@kernel("pixel_shuffle")
def _pixel_shuffle(c: Call) -> np.ndarray:
    x = c.x()
    r = c.int("upscale_factor")
    b, ch, h, w = x.shape
    oc = ch // (r * r)
    return x.reshape(b, oc, r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, oc, h * r, w * r)


@kernel("upsample_nearest_neighbor")
def _upsample_nearest(c: Call) -> np.ndarray:
    x = c.x()
    sh = c.float("scale_factor_height", 1.0)
    sw = c.float("scale_factor_width", 1.0)
    h, w = x.shape[-2:]
    oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    rows = np.minimum(np.floor(np.arange(oh) / sh).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) / sw).astype(np.int64), w - 1)
    return x[..., rows, :][..., cols]


@kernel("shape")
def _shape(c: Call) -> np.ndarray:
    return np.array(np.asarray(c("x")).shape, dtype=np.int32)


@kernel("range_1d")
def _range_1d(c: Call) -> np.ndarray:
    start, end, step = (np.asarray(c(k)).reshape(()) for k in ("start", "end", "step"))
    return np.arange(start, end, step)
