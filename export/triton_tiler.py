"""Triton Python-backend model that upscales any image size through a fixed-shape ESC engine.

This file is copied verbatim to ``<name>_tiled/1/model.py`` by :mod:`export.triton_repo`;
inside Triton it runs with numpy and ``triton_python_backend_utils`` only, because NVIDIA's
Triton container has no torch and no esc-deploy.  That is also why it does not import
:mod:`runtimes.tiling`: it follows the same scheme ("crop the context away") in numpy.

Scheme: windows of the engine's shape are placed evenly along each axis (first at the
start, last flush with the end) at most ``tile - 2 * overlap`` apart; each output pixel
comes from exactly one window, the boundary between two windows being the middle of their
overlap, so every kept pixel has ``overlap`` pixels of real context.  An axis shorter than
the engine's is padded after its end (reflection where possible, else edge replication)
and the extra output is cropped.  Windows go to the engine model in batches of at most
its ``max_batch_size`` through BLS requests.

Configuration (``parameters`` in ``config.pbtxt``): ``engine_model``, ``engine_input``,
``engine_output``, ``engine_dtype`` (``float32``/``float16``), ``tile_height``,
``tile_width``, ``overlap``, ``scale``, ``engine_batch`` (0: the engine takes one window
per call with no batch dimension).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

#: Maps windows (B, 3, th, tw) to (B, 3, th * scale, tw * scale).
EngineFn = Callable[[np.ndarray], np.ndarray]


def axis_windows(length: int, window: int, overlap: int) -> list[tuple[int, int, int]]:
    """``(start, keep_start, keep_end)`` of each window along an axis of ``length`` pixels."""
    if length <= window:
        return [(0, 0, length)]
    gaps = math.ceil((length - window) / (window - 2 * overlap))
    starts = [k * (length - window) // gaps for k in range(gaps + 1)]
    edges = [0, *((a + b + window) // 2 for a, b in zip(starts, starts[1:])), length]
    return [(start, edges[k], edges[k + 1]) for k, start in enumerate(starts)]


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad a (3, h, w) image after its ends to at least ``height`` x ``width``."""
    for axis, size in ((1, height), (2, width)):
        extra = size - image.shape[axis]
        if extra > 0:
            spec = [(0, 0)] * 3
            spec[axis] = (0, extra)
            image = np.pad(image, spec, mode="reflect" if extra < image.shape[axis] else "edge")
    return image


def tiled_upscale(image: np.ndarray, engine: EngineFn, tile: tuple[int, int], scale: int, overlap: int,
                  batch: int) -> np.ndarray:
    """Upscale one (3, H, W) float image through ``engine`` in ``tile``-sized windows."""
    (th, tw), (h, w) = tile, image.shape[1:]
    if min(th, tw) <= 2 * overlap:
        raise ValueError(f"overlap {overlap} is too large for {th}x{tw} windows")
    padded = pad_to(image, th, tw)
    rows, cols = axis_windows(h, th, overlap), axis_windows(w, tw, overlap)
    places = [(r, c) for r in rows for c in cols]
    out = np.empty((3, h * scale, w * scale), dtype=np.float32)
    for first in range(0, len(places), batch):
        group = places[first:first + batch]
        windows = np.stack([padded[:, r[0]:r[0] + th, c[0]:c[0] + tw] for r, c in group])
        result = engine(windows)
        for (r, c), sr in zip(group, result):
            out[:, r[1] * scale:r[2] * scale, c[1] * scale:c[2] * scale] = sr[
                :, (r[1] - r[0]) * scale:(r[2] - r[0]) * scale, (c[1] - c[0]) * scale:(c[2] - c[0]) * scale]
    return out


def check_input(lr: np.ndarray, max_side: int) -> str | None:
    """Why ``lr`` cannot be upscaled, or ``None``."""
    if lr.dtype != np.float32:
        return f"input 'lr' must be FP32, got {lr.dtype}"
    if lr.ndim != 4 or lr.shape[1] != 3:
        return f"input 'lr' must be N x 3 x H x W, got shape {list(lr.shape)}"
    if 0 in lr.shape:
        return f"input 'lr' is empty (shape {list(lr.shape)})"
    if max(lr.shape[2:]) > max_side:
        return f"input 'lr' is {lr.shape[2]}x{lr.shape[3]}, above this model's limit of {max_side} per side"
    return None


class TritonPythonModel:
    """The Python-backend entry points: ``initialize`` and ``execute``."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils  # only inside Triton: the functions above are unit-tested

        self.pb = pb_utils
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.engine_model = params["engine_model"]
        self.engine_input, self.engine_output = params["engine_input"], params["engine_output"]
        self.engine_dtype = np.dtype(params["engine_dtype"])
        self.tile = (int(params["tile_height"]), int(params["tile_width"]))
        self.overlap, self.scale = int(params["overlap"]), int(params["scale"])
        self.engine_batch = int(params["engine_batch"])
        self.max_side = int(params["max_side"])

    def _engine(self, windows: np.ndarray) -> np.ndarray:
        """One BLS call to the engine model (one window per call when it has no batch dimension)."""
        if self.engine_batch == 0:
            return np.concatenate([self._call(w) for w in windows[:, None]])
        return self._call(windows)

    def _call(self, windows: np.ndarray) -> np.ndarray:
        pb = self.pb
        request = pb.InferenceRequest(model_name=self.engine_model, requested_output_names=[self.engine_output],
                                      inputs=[pb.Tensor(self.engine_input, windows.astype(self.engine_dtype))])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"engine model {self.engine_model}: {response.error().message()}")
        return pb.get_output_tensor_by_name(response, self.engine_output).as_numpy().astype(np.float32)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses = []
        for request in requests:
            lr = pb.get_input_tensor_by_name(request, "lr").as_numpy()
            problem = check_input(lr, self.max_side)
            if problem is not None:
                responses.append(pb.InferenceResponse(error=pb.TritonError(problem)))
                continue
            batch = max(self.engine_batch, 1)
            try:
                sr = np.stack([tiled_upscale(img, self._engine, self.tile, self.scale, self.overlap, batch)
                               for img in lr])
            except Exception as exc:  # an engine failure answers this request, never stops the model
                responses.append(pb.InferenceResponse(error=pb.TritonError(f"{type(exc).__name__}: {exc}")))
                continue
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor("sr", sr)]))
        return responses
