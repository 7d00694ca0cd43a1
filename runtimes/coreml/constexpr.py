"""Compile-time (``constexpr_*``) kernels: compressed weights expanded once at load time.

The three forms coremltools writes for ``--compress``: int8 as ``constexpr_affine_dequantize``
(iOS 16/17) or ``constexpr_blockwise_shift_scale`` (iOS 18), palettised LUTs as
``constexpr_lut_to_dense`` (iOS 16 packed-index and iOS 18 per-block layouts).
"""
from __future__ import annotations

import math

import numpy as np

from .reader import unpack_bits
from .registry import KERNELS, Call, axis_index, kernel

__all__ = ["COMPILE_TIME_OPS"]

# -- compile-time (constexpr) weight decompression --------------------------------------------
def _broadcast_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter (same rank as ``shape``) up to ``shape``."""
    out = np.asarray(param)
    for axis, (size, n) in enumerate(zip(shape, out.shape)):
        if n != size:
            out = np.repeat(out, size // n, axis=axis)
    return out


@kernel("constexpr_affine_dequantize")
def _affine_dequantize(c: Call) -> np.ndarray:
    data = np.asarray(c("quantized_data")).astype(np.float32)
    zero = np.asarray(c("zero_point")).astype(np.float32)
    scale = np.asarray(c("scale")).astype(np.float32)
    axis = axis_index(c.int("axis", 0), data.ndim)
    shape = [1] * data.ndim
    if scale.size > 1:
        shape[axis] = -1
        scale = scale.reshape(shape)
    if zero.size > 1:
        shape[axis] = -1
        zero = zero.reshape(shape)
    return scale * (data - zero)


@kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(c: Call) -> np.ndarray:
    data = np.asarray(c("data")).astype(np.float32)
    scale = _broadcast_blocks(np.asarray(c("scale")).astype(np.float32), data.shape)
    offset = c("offset")
    if offset is not None:
        data = data - _broadcast_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return scale * data


@kernel("constexpr_lut_to_dense")
def _lut_to_dense(c: Call) -> np.ndarray:
    lut = np.asarray(c("lut"))
    if c.has("shape"):  # iOS16: flat LUT, packed uint8 indices, output shape
        shape = tuple(c.ints("shape"))
        nbits = int(round(math.log2(lut.shape[0])))
        count = int(np.prod(shape))
        indices = unpack_bits(np.asarray(c("indices")), nbits, count, signed=False).astype(np.int64)
        return lut[indices].reshape(shape)
    # iOS18: indices already unpacked (sub-byte dtype), LUT of rank K + 2 (per-block tables,
    # palette size, vector size).
    indices = np.asarray(c("indices")).astype(np.int64)
    k = indices.ndim
    vector = lut.shape[-1]
    out_shape = list(indices.shape)
    if vector == 1:
        tables = [lut.shape[i] for i in range(k)]
        block = [indices.shape[i] // tables[i] for i in range(k)]
        grid = np.meshgrid(*[np.arange(s) // b for s, b in zip(indices.shape, block)], indexing="ij")
        return lut[tuple(grid) + (indices, 0)]
    axis = axis_index(c.int("vector_axis", 0), k)
    tables = [lut.shape[i] for i in range(k)]
    block = [indices.shape[i] // tables[i] for i in range(k)]
    grid = np.meshgrid(*[np.arange(s) // b for s, b in zip(indices.shape, block)], indexing="ij")
    vectors = lut[tuple(grid) + (indices,)]  # indices.shape + (vector,)
    vectors = np.moveaxis(vectors, -1, axis + 1)
    out_shape[axis] *= vector
    return vectors.reshape(out_shape)


COMPILE_TIME_OPS = frozenset(name for name in KERNELS if name.startswith("constexpr_"))
