"""Tiled inference that any runtime (PyTorch, ONNX Runtime, TensorRT, …) can use.

Large images do not fit through a model in one call, and fixed-shape engines
accept only one input size, so :func:`tiled_upscale` cuts the image into
windows, upscales them in batches and stitches the results.

The scheme ("crop the context away"):

* ``tile`` is the size of each model call's input window, i.e. what bounds
  memory and what a fixed-shape engine is built for.  Windows are placed
  evenly along each axis, the first at the start, the last flush with the end,
  so every window is full size and lies inside the image; along an axis
  shorter than ``tile`` the window is the whole axis.  All windows therefore
  share one shape and batch together, across images too.
* Neighbouring windows overlap by at least ``2 * overlap`` pixels.  Each output
  pixel is taken from exactly one window: the boundary between two windows is
  the middle of their overlap, so every pixel used has at least ``overlap``
  pixels of real context on each side, except where the image itself ends
  (and there the window edge *is* the image edge, as in an untiled run).
* Consequently, if ``overlap`` is at least the model's receptive-field radius
  (in input pixels) the tiled result equals the untiled one up to float
  rounding: no blending or feathering is needed, and no seam can appear.  With
  a smaller overlap the pixels near a boundary see less context than untiled
  and may differ.

Window alignment (``align``): a model whose attention windows sit on a fixed grid from
the image origin (ESC: 32x32) sees different windows in a tile that starts off that grid.
With ``align`` > 1 (and no ``fixed_shape``), window starts are multiples of ``align``, so
every tile's attention windows are the untiled run's windows.  A window that would
reach past the image end is shortened to end there instead of being moved back off the
grid; it then pads internally exactly as the untiled image does.  Windows therefore
come in at most four shapes (interior, last row, last column, corner), and calls batch
windows of one shape.

Padding (``multiple`` and ``fixed_shape``): when a call's input has to be a
multiple of some size (window attention) or exactly ``fixed_shape`` (static
engines), each window is padded at the bottom/right, by reflection where the
window is large enough and by edge replication otherwise (PyTorch's reflect
padding needs pad < size), and the extra output is cropped.  Padding only ever
extends a window beyond the image edge, so it changes only what the model
sees past that edge (reflected pixels instead of whatever the model pads
with internally); with tiles that are already the right size nothing is
padded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from tqdm import tqdm

__all__ = ["TileOptions", "UpscaleFn", "tiled_upscale", "upscale_alpha"]

#: Maps a batch (B, 3, h, w) to (B, 3, h * scale, w * scale).
UpscaleFn = Callable[[torch.Tensor], torch.Tensor]


class TileOptions(TypedDict, total=False):
    """The tiling keywords of :meth:`runtimes.base.Runner.upscale` and ``upscale_alpha``.

    Written once so the two methods (and back-ends) share one signature instead of
    repeating it.  ``None`` (the default) for ``tile``, ``overlap``, ``batch_size``
    lets the runner choose them from ``memory_budget`` (bytes; default a safe share of
    free memory, see :func:`runtimes.memory.plan_tiles`); ``progress=False``,
    ``fixed_shape=None``; their meaning is that of :func:`tiled_upscale`.
    """

    tile: int | None
    overlap: int | None
    batch_size: int | None
    progress: bool
    fixed_shape: tuple[int, int] | None
    memory_budget: int | None


@dataclass(frozen=True)
class _Span:
    """One window along one axis and the part of it whose output is kept."""

    start: int  # first input pixel of the window
    size: int  # input pixels of the window
    keep_start: int  # first input pixel whose output this window provides
    keep_end: int  # one past the last such pixel


@dataclass(frozen=True)
class _Tile:
    image: int
    rows: _Span
    cols: _Span


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _plan_axis(length: int, window: int, overlap: int) -> list[_Span]:
    """Place windows of size ``window`` along an axis of ``length`` pixels.

    The number of windows is the smallest for which evenly spaced windows are
    at most ``window - 2 * overlap`` apart, which is exactly what guarantees
    each kept pixel ``overlap`` pixels of context inside its window (the
    keep boundary is the middle of each pairwise overlap).
    """
    if length <= window:
        return [_Span(0, length, 0, length)]
    stride = window - 2 * overlap
    gaps = math.ceil((length - window) / stride)
    starts = [k * (length - window) // gaps for k in range(gaps + 1)]
    return _spans(starts, [window] * len(starts), length)


def _plan_axis_aligned(length: int, window: int, overlap: int, align: int) -> list[_Span]:
    """Windows starting on multiples of ``align``, the last shortened to end at ``length``.

    The stride is the largest multiple of ``align`` that keeps ``2 * overlap`` pixels
    of overlap; a window that would pass the end stops there (it keeps more than
    ``2 * overlap`` pixels, because its predecessor did not reach the end).
    """
    if length <= window:
        return [_Span(0, length, 0, length)]
    stride = (window - 2 * overlap) // align * align
    if stride < align:
        raise ValueError(f"tile={window} leaves no {align}-pixel step after 2 * overlap = {2 * overlap}; "
                         f"use a tile of at least {2 * overlap + align} or a smaller overlap")
    starts = list(range(0, length - window, stride)) + [math.ceil((length - window) / stride) * stride]
    return _spans(starts, [min(window, length - s) for s in starts], length)


def _spans(starts: list[int], sizes: list[int], length: int) -> list[_Span]:
    """Spans whose kept parts meet in the middle of each pairwise overlap."""
    bounds = [0] + [(b + a + size) // 2 for a, b, size in zip(starts, starts[1:], sizes)] + [length]
    return [_Span(s, size, bounds[k], bounds[k + 1]) for k, (s, size) in enumerate(zip(starts, sizes))]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_axis(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Pad ``x`` by ``pad`` pixels after its end along ``dim`` (-1 or -2)."""
    if pad == 0:
        return x
    spec = (0, pad, 0, 0) if dim == -1 else (0, 0, 0, pad)
    mode = "reflect" if pad < x.shape[dim] else "replicate"
    return F.pad(x, spec, mode=mode)


def _batches(tiles: Sequence[_Tile], batch_size: int) -> Iterator[Sequence[_Tile]]:
    """Up to ``batch_size`` tiles of one window shape per call, in plan order within a shape."""
    shapes: dict[tuple[int, int], list[_Tile]] = {}
    for t in tiles:
        shapes.setdefault((t.rows.size, t.cols.size), []).append(t)
    for group in shapes.values():
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def _window_sides(tile: int | None, fixed_shape: tuple[int, int] | None) -> dict[str, object]:
    """The window's sides by argument name (for messages); empty when untiled."""
    if fixed_shape is None:
        return {} if tile is None else {"tile": tile}
    if tile is not None:
        raise ValueError("pass either tile or fixed_shape, not both: fixed_shape sets the window size")
    if not isinstance(fixed_shape, (tuple, list)) or len(fixed_shape) != 2:
        raise ValueError(f"fixed_shape must be (height, width), got {fixed_shape!r}")
    return {"fixed_shape[0]": fixed_shape[0], "fixed_shape[1]": fixed_shape[1]}


def _validate(
    scale: int,
    tile: int | None,
    overlap: int,
    batch_size: int = 4,
    multiple: int = 1,
    fixed_shape: tuple[int, int] | None = None,
    progress: bool = False,
    align: int = 1,
) -> tuple[int, int] | None:
    """Check the tiling arguments; return the window (h, w), or None for untiled.

    Takes every keyword of :func:`tiled_upscale` (``progress`` is accepted and
    ignored) so :func:`upscale_alpha` can validate the options it forwards.
    """
    _check_int("scale", scale, 1)
    _check_int("overlap", overlap, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("multiple", multiple, 1)
    _check_int("align", align, 1)
    sides = _window_sides(tile, fixed_shape)
    for name, size in sides.items():
        _check_int(name, size, 1)
        if size <= 2 * overlap:  # type: ignore[operator]
            raise ValueError(f"{name}={size} must be > 2 * overlap = {2 * overlap}")
        if size % multiple:  # type: ignore[operator]
            raise ValueError(f"{name}={size} must be a multiple of multiple={multiple}")
    if not sides:
        return None
    values = list(sides.values())
    return (values[0], values[-1])  # type: ignore[return-value]


def _check_planes(name: str, planes: object, channels: int) -> None:
    """Refuse anything but an (N, channels, H, W) tensor, naming the argument."""
    if not isinstance(planes, torch.Tensor) or planes.ndim != 4 or planes.shape[1] != channels:
        shape = tuple(planes.shape) if isinstance(planes, torch.Tensor) else type(planes).__name__
        raise ValueError(f"{name} must be an (N, {channels}, H, W) tensor, got {shape}")


@torch.no_grad()
def tiled_upscale(
    upscale_fn: UpscaleFn,
    image: torch.Tensor,
    scale: int,
    tile: int | None,
    overlap: int,
    batch_size: int = 4,
    multiple: int = 1,
    progress: bool = False,
    fixed_shape: tuple[int, int] | None = None,
    align: int = 1,
) -> torch.Tensor:
    """Upscale ``image`` (N, 3, H, W) by ``scale`` through ``upscale_fn``, in tiles.

    Args:
        upscale_fn: maps (B, 3, h, w) to (B, 3, h * scale, w * scale); a
            PyTorch module, an ONNX Runtime session wrapper, anything.
        image: (N, 3, H, W) input batch.
        scale: the model's integer upscaling factor.
        tile: input window size (square), or ``None`` for one call per image.
            Must exceed ``2 * overlap`` and be a multiple of ``multiple``.
        overlap: context pixels cropped from each side of a window; make it
            at least the model's receptive-field radius for a seamless
            result identical to an untiled run (see the module docstring).
        batch_size: windows per call.  Windows always share one shape, so
            windows of different images in ``image`` are batched together.
        multiple: every call's height and width are padded up to a multiple
            of this (for models that need it, e.g. window attention).
        progress: show a tqdm progress bar over windows.
        fixed_shape: (height, width) every call must have exactly, for
            static-shape engines.  It replaces ``tile`` (pass ``tile=None``):
            windows are this size, and images smaller than it in a dimension
            are padded (reflect, or replicate when too small) and cropped.
        align: window starts on multiples of this (the model's attention-window
            grid), see the module docstring; ignored with ``fixed_shape``.

    Returns:
        (N, 3, H * scale, W * scale) tensor with the dtype and device of
        ``upscale_fn``'s output.

    Inference only: runs under ``torch.no_grad()``.
    """
    window = _validate(scale, tile, overlap, batch_size, multiple, fixed_shape, align=align)
    _check_planes("image", image, 3)
    n, _, height, width = image.shape
    if n == 0 or height == 0 or width == 0:
        raise ValueError(f"image must be non-empty, got shape {tuple(image.shape)}")
    win_h, win_w = window if window is not None else (height, width)

    if align > 1 and fixed_shape is None:
        row_spans, col_spans = (_plan_axis_aligned(height, win_h, overlap, align),
                                _plan_axis_aligned(width, win_w, overlap, align))
    else:
        row_spans, col_spans = _plan_axis(height, win_h, overlap), _plan_axis(width, win_w, overlap)
    tiles = [_Tile(i, r, c) for i in range(n) for r in row_spans for c in col_spans]

    out: torch.Tensor | None = None
    with tqdm(total=len(tiles), disable=not progress, desc="tiles", unit="tile") as bar:
        for group in _batches(tiles, batch_size):
            in_h, in_w = group[0].rows.size, group[0].cols.size
            if fixed_shape is not None:
                call_h, call_w = fixed_shape
            else:
                call_h, call_w = _round_up(in_h, multiple), _round_up(in_w, multiple)
            batch = torch.stack(
                [
                    image[t.image, :, t.rows.start : t.rows.start + in_h, t.cols.start : t.cols.start + in_w]
                    for t in group
                ]
            )
            batch = _pad_axis(_pad_axis(batch, call_h - in_h, -2), call_w - in_w, -1)
            result = upscale_fn(batch)
            expected = (len(group), 3, call_h * scale, call_w * scale)
            if not isinstance(result, torch.Tensor) or tuple(result.shape) != expected:
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                raise ValueError(
                    f"upscale_fn returned {got} for input {tuple(batch.shape)}; expected {expected} "
                    f"(is scale={scale} right?)"
                )
            if out is None:
                out = result.new_empty((n, 3, height * scale, width * scale))
            for t, up in zip(group, result):
                r0, r1 = t.rows.keep_start, t.rows.keep_end
                c0, c1 = t.cols.keep_start, t.cols.keep_end
                dr, dc = r0 - t.rows.start, c0 - t.cols.start
                out[t.image, :, r0 * scale : r1 * scale, c0 * scale : c1 * scale] = up[
                    :, dr * scale : (dr + r1 - r0) * scale, dc * scale : (dc + c1 - c0) * scale
                ]
            bar.update(len(group))
    assert out is not None  # at least one tile always exists
    return out


def upscale_alpha(
    upscale_fn: UpscaleFn,
    alpha: torch.Tensor,
    scale: int,
    tile: int | None,
    overlap: int,
    **options: Any,
) -> torch.Tensor:
    """Upscale an alpha plane (N, 1, H, W) with the colour model.

    The plane is replicated to three channels, sent through
    :func:`tiled_upscale` with the same arguments (``options``: its keywords
    ``batch_size``, ``multiple``, ``progress``, ``fixed_shape``, ``align``), averaged back
    to one channel and clamped to [0, 1].  Using the same model keeps the alpha
    edges aligned with the sharpened colour edges, which a bicubic alpha
    would not be.  A plane that is constant in every image (the common
    "RGBA but fully opaque" case) is returned as that constant without
    calling the model: the model would only add noise to it, at the cost of
    a second full inference.  The arguments are checked either way.

    Returns:
        (N, 1, H * scale, W * scale) tensor.
    """
    _check_planes("alpha", alpha, 1)
    _validate(scale, tile, overlap, **options)
    n, _, height, width = alpha.shape
    flat = alpha.reshape(n, -1)
    if flat.shape[1] and bool((flat.amin(dim=1) == flat.amax(dim=1)).all()):
        constant = flat[:, :1].clamp(0.0, 1.0).reshape(n, 1, 1, 1)
        return constant.expand(n, 1, height * scale, width * scale).clone()
    up = tiled_upscale(upscale_fn, alpha.expand(n, 3, height, width), scale, tile, overlap, **options)
    return up.mean(dim=1, keepdim=True).clamp(0.0, 1.0)
