"""Weight compression for Core ML packages: k-means palettisation or int8, convolutions only.

Runs as extra passes at the end of coremltools' pipeline (so the constant-folding limit
of :mod:`export.coreml.convert` still holds): ``palettize8`` / ``palettize4`` (k-means
look-up tables, per tensor; at 4 bits on iOS 18+ one table per 16 output channels; the
k-means is our own 1-D weighted Lloyd, :class:`KMeansLUT`, so no scikit-learn is needed)
or ``int8`` (per-channel symmetric linear). Only convolution weights of more than 512
elements are compressed: the attention bias tables stay exact.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["KMeansLUT", "add_compression_passes"]

#: Weights with at most this many elements stay uncompressed.
WEIGHT_THRESHOLD = 512


class KMeansLUT:
    """A coremltools ``lut_function``: 1-D weighted k-means (Lloyd), quantile + uniform start.

    Returns ``(lut, indices)`` for a weight tensor: ``2**nbits`` centroids and one index
    per element. Deterministic and numpy-only (coremltools' own k-means needs scikit-learn).
    """

    def __init__(self, nbits: int, iterations: int = 100) -> None:
        self.nbits = nbits
        self.iterations = iterations

    def __call__(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = 1 << self.nbits
        values, inverse, counts = np.unique(np.asarray(weight, dtype=np.float64).reshape(-1),
                                            return_inverse=True, return_counts=True)
        lut = np.zeros(k, dtype=np.float64)
        if len(values) <= k:
            lut[: len(values)] = values
            return lut.astype(weight.dtype), inverse.reshape(-1).astype(np.uint8)
        # Start from half quantiles (where the mass is) and half a uniform grid over the
        # range (the tails: Lloyd never moves a centroid into an empty tail, and a large
        # kernel's few big taps matter most); ESC's 13x13 kernel at 8 bits: max error
        # 7e-4 instead of 2e-2 with quantiles alone.
        cdf = (np.cumsum(counts) - 0.5 * counts) / counts.sum()
        half = k // 2
        centroids = np.sort(np.concatenate([np.interp((np.arange(half) + 0.5) / half, cdf, values),
                                            np.linspace(values[0], values[-1], k - half)]))
        for _ in range(self.iterations):
            bounds = 0.5 * (centroids[1:] + centroids[:-1])
            assign = np.searchsorted(bounds, values)
            mass = np.bincount(assign, weights=counts, minlength=k)
            total = np.bincount(assign, weights=counts * values, minlength=k)
            updated = np.where(mass > 0, total / np.maximum(mass, 1e-300), centroids)
            updated.sort()
            if np.allclose(updated, centroids, rtol=0, atol=1e-12):
                centroids = updated
                break
            centroids = updated
        bounds = 0.5 * (centroids[1:] + centroids[:-1])
        assign = np.searchsorted(bounds, values)
        return centroids.astype(weight.dtype), assign[inverse.reshape(-1)].astype(np.uint8)


def add_compression_passes(pipeline: Any, compress: str, opset: str) -> None:
    """Append the ``compress`` pass (``palettize4|8`` or ``int8``) for conv weights to ``pipeline``."""
    import coremltools.optimize.coreml as cto

    if compress.startswith("palettize"):
        nbits = int(compress[len("palettize"):])
        # iOS 18 LUTs can be per group of output channels: at 4 bits one table per 16
        # channels keeps the large kernel's taps (older opsets: one table per tensor).
        grouped = nbits <= 4 and opset >= "iOS18"
        op_config = cto.OpPalettizerConfig(
            mode="custom", lut_function=KMeansLUT(nbits), weight_threshold=WEIGHT_THRESHOLD,
            granularity="per_grouped_channel" if grouped else "per_tensor", group_size=16 if grouped else 0)
        pass_name = "compression::palettize_weights"
    else:
        op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD)
        pass_name = "compression::linear_quantize_weights"
    pipeline.append_pass(pass_name)
    pipeline.append_pass("common::dead_code_elimination")
    pipeline.set_options(pass_name, {"config": cto.OptimizationConfig(op_type_configs={"conv": op_config})})
