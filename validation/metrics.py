"""PSNR / SSIM following the super-resolution papers' evaluation convention.

Contract (one for every function here): images are numpy arrays shaped HxWx3
(RGB) or, with ``y_channel=False``, HxW / HxWxC, holding pixel values on the
**0..255 scale** — either ``uint8`` or a float/integer array in [0, 255].
Images in [0, 1] must be multiplied by 255 first; nothing here guesses the
range, because a guess silently changes PSNR by 48 dB when it is wrong.

The SR convention (EDSR, SwinIR, ESC, ...): shave ``scale`` pixels off every
border, convert RGB to BT.601 luma Y on 16..235 (float, not rounded), then
PSNR with peak 255 and SSIM with an 11x11 Gaussian (sigma 1.5) window, valid
filtering, C1 = (0.01*255)^2, C2 = (0.03*255)^2, all in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["rgb_to_y", "shave", "psnr", "ssim"]

_Y_COEFFS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _as_image(img: np.ndarray, name: str) -> np.ndarray:
    """Validate dtype/rank/finiteness and return a float64 view of ``img``."""
    arr = np.asarray(img)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name}: expected a uint8 or float image, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name}: expected HxW or HxWxC, got shape {arr.shape}")
    out = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name}: image contains NaN or inf")
    return out


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an HxWx3 RGB image on the 0..255 scale, as float64 in 16..235.

    ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` with R, G, B in [0, 1]
    (MATLAB's ``rgb2ycbcr``), i.e. the inputs here are divided by 255 first.
    Y is not rounded: the papers' Python evaluation code keeps it float.
    """
    arr = _as_image(img, "rgb_to_y")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"rgb_to_y: expected HxWx3 RGB, got shape {arr.shape}")
    return 16.0 + arr @ _Y_COEFFS / 255.0


def shave(img: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels from each side of the two spatial axes.

    SR models cannot reconstruct the outermost ``scale`` pixels well (the
    bicubic degradation mixed them with pixels that do not exist), so the
    papers exclude them; ``border=0`` returns the image unchanged.
    """
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    arr = np.asarray(img)
    if arr.ndim < 2:
        raise ValueError(f"shave: expected at least 2 dims, got shape {arr.shape}")
    if border == 0:
        return arr
    if 2 * border >= min(arr.shape[0], arr.shape[1]):
        raise ValueError(f"border {border} leaves nothing of an image of shape {arr.shape}")
    return arr[border:-border, border:-border, ...]


def _prepare_pair(
    a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a pair, shave the border and (optionally) reduce to Y, in float64."""
    fa, fb = _as_image(a, "a"), _as_image(b, "b")
    if fa.shape != fb.shape:
        raise ValueError(f"image shapes differ: {fa.shape} vs {fb.shape}")
    if y_channel and (fa.ndim != 3 or fa.shape[2] != 3):
        raise ValueError(f"y_channel=True needs HxWx3 RGB images, got shape {fa.shape}")
    fa, fb = shave(fa, crop_border), shave(fb, crop_border)
    if y_channel:
        fa, fb = rgb_to_y(fa), rgb_to_y(fb)
    return fa, fb


def psnr(
    a: np.ndarray,
    b: np.ndarray,
    crop_border: int,
    y_channel: bool = True,
    data_range: float = 255.0,
) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical inputs.

    ``data_range`` is the peak value of the compared signal; keep 255 for the
    0..255 contract (Y on 16..235 is still measured against 255, as in the papers).
    """
    fa, fb = _prepare_pair(a, b, crop_border, y_channel)
    mse = float(np.mean((fa - fb) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(float(data_range) ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian (OpenCV ``getGaussianKernel``); the 2-D window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D image with ``outer(g, g)``."""
    k = g.size
    rows = sliding_window_view(img, k, axis=0) @ g  # (H-k+1, W)
    return sliding_window_view(rows, k, axis=1) @ g  # (H-k+1, W-k+1)


def _ssim_2d(x: np.ndarray, y: np.ndarray) -> float:
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    g = _gaussian_window()
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mu_x * mu_x
    syy = _filter_valid(y * y, g) - mu_y * mu_y
    sxy = _filter_valid(x * y, g) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool = True) -> float:
    """Structural similarity as in the SR papers' ``calculate_ssim``.

    With ``y_channel=False`` and several channels the per-channel SSIMs are
    averaged.  Images (after the crop) must be at least 11x11.
    """
    fa, fb = _prepare_pair(a, b, crop_border, y_channel)
    if min(fa.shape[0], fa.shape[1]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {fa.shape[:2]}")
    if fa.ndim == 2:
        return _ssim_2d(fa, fb)
    return float(np.mean([_ssim_2d(fa[..., c], fb[..., c]) for c in range(fa.shape[2])]))
