"""Tests for validation/: MATLAB bicubic resize, SR-convention PSNR/SSIM, bicubic baseline."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from validation import imresize, psnr, rgb_to_y, shave, ssim
from validation.bicubic_baseline import evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]

# Published bicubic Set5 figures (Y channel, border = scale), e.g. the EDSR/SwinIR tables.
PUBLISHED = {2: (33.66, 0.9299), 3: (30.39, 0.8682), 4: (28.42, 0.8104)}


@pytest.fixture(scope="module")
def set5(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "Set5"
    if not (path / "HR").is_dir():
        pytest.skip(f"missing shared data: {path / 'HR'}")
    return path


# --------------------------------------------------------------------------- baseline


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_baseline_reproduces_published_set5(set5: Path, scale: int) -> None:
    scores = evaluate(set5, scale)
    assert len(scores) == 5
    mean_psnr = float(np.mean([s.psnr for s in scores]))
    mean_ssim = float(np.mean([s.ssim for s in scores]))
    pub_psnr, pub_ssim = PUBLISHED[scale]
    assert abs(mean_psnr - pub_psnr) <= 0.05, (scale, mean_psnr)
    # Float Y gives SSIM ~0.0005-0.0009 above the published (MATLAB) figures.
    assert abs(mean_ssim - pub_ssim) <= 0.005, (scale, mean_ssim)


@pytest.mark.parametrize("as_module", [False, True])
def test_bicubic_baseline_cli(set5: Path, as_module: bool) -> None:
    target = ["-m", "validation.bicubic_baseline"] if as_module else ["validation/bicubic_baseline.py"]
    proc = subprocess.run(
        [sys.executable, *target, "--dataset", str(set5), "--scale", "4"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    mean_line = proc.stdout.strip().splitlines()[-1]
    assert "mean" in mean_line and "28.43" in mean_line, proc.stdout


# --------------------------------------------------------------------------- metrics


def _random_rgb(seed: int, shape: tuple[int, ...] = (32, 40, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_psnr_identical_is_inf() -> None:
    img = _random_rgb(0)
    assert psnr(img, img, crop_border=4) == math.inf
    assert psnr(img, img.astype(np.float64), crop_border=0, y_channel=False) == math.inf


def test_psnr_constant_offset_matches_analytic() -> None:
    a = np.full((20, 24, 3), 100, dtype=np.uint8)
    b = a + np.uint8(5)
    # RGB: every value differs by 5 -> MSE 25.
    expected = 10 * math.log10(255**2 / 25)
    assert psnr(a, b, crop_border=2, y_channel=False) == pytest.approx(expected, abs=1e-12)
    # Y: a grey offset of 5 moves Y by 5 * (65.481 + 128.553 + 24.966) / 255 = 5 * 219 / 255.
    dy = 5 * 219.0 / 255.0
    expected_y = 10 * math.log10(255**2 / dy**2)
    assert psnr(a, b, crop_border=2) == pytest.approx(expected_y, abs=1e-9)
    # data_range is the peak used in the formula.
    assert psnr(a / 255.0, b / 255.0, 0, y_channel=False, data_range=1.0) == pytest.approx(
        expected, abs=1e-9
    )


def test_psnr_crop_border_excludes_edges() -> None:
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[0, :, :] = 255  # only the top row differs
    assert psnr(a, b, crop_border=1) == math.inf
    assert psnr(a, b, crop_border=0) < 20


def test_metrics_reject_bad_inputs() -> None:
    a = _random_rgb(1)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(a, a[:-1], crop_border=0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[:, :-1], crop_border=0)
    with pytest.raises(ValueError, match="RGB"):
        psnr(a[..., 0], a[..., 0], crop_border=0)  # grey image but y_channel=True
    with pytest.raises(ValueError, match="dtype"):
        psnr(a.astype(bool), a.astype(bool), crop_border=0)
    with pytest.raises(ValueError, match="HxW"):
        psnr(a[None], a[None], crop_border=0)
    with pytest.raises(ValueError, match="NaN"):
        psnr(np.full((8, 8, 3), np.nan), np.zeros((8, 8, 3)), crop_border=0)
    with pytest.raises(ValueError, match="11x11"):
        ssim(a, a, crop_border=12)


def test_rgb_to_y_range() -> None:
    black, white = np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8)
    assert rgb_to_y(black)[0, 0] == pytest.approx(16.0)
    assert rgb_to_y(white)[0, 0] == pytest.approx(235.0)


def test_shave() -> None:
    img = np.arange(6 * 7).reshape(6, 7)
    assert shave(img, 0) is not None and shave(img, 0).shape == (6, 7)
    np.testing.assert_array_equal(shave(img, 2), img[2:4, 2:5])
    with pytest.raises(ValueError):
        shave(img, 3)


def test_ssim_identical_and_ordering() -> None:
    a = _random_rgb(2, (48, 48, 3))
    assert ssim(a, a, crop_border=4) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(3)
    light = np.clip(a + rng.normal(0, 5, a.shape), 0, 255)
    heavy = np.clip(a + rng.normal(0, 40, a.shape), 0, 255)
    s_light, s_heavy = ssim(a, light, 4), ssim(a, heavy, 4)
    assert 0 < s_heavy < s_light < 1
    # Per-channel SSIM averages; on a grey image it equals SSIM of that channel.
    grey = np.repeat(a[..., :1], 3, axis=2)
    grey_noisy = np.repeat(light[..., :1], 3, axis=2)
    assert ssim(grey, grey_noisy, 0, y_channel=False) == pytest.approx(
        ssim(grey[..., 0], grey_noisy[..., 0], 0, y_channel=False)
    )


# --------------------------------------------------------------------------- imresize


def _ref_cubic(x: float) -> float:
    ax = abs(x)
    if ax <= 1:
        return 1.5 * ax**3 - 2.5 * ax**2 + 1
    if ax <= 2:
        return -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2
    return 0.0


def _ref_mirror(k: int, n: int) -> int:
    """1-based symmetric reflection: 0 -> 1, -1 -> 2, n+1 -> n."""
    while k < 1 or k > n:
        k = 1 - k if k < 1 else 2 * n + 1 - k
    return k


def _ref_taps(out_index: int, n_in: int, scale: float) -> dict[int, float]:
    """Normalised weights {0-based input index: weight} for one 1-based output index."""
    x = out_index / scale + 0.5 * (1 - 1 / scale)
    stretch = scale if scale < 1 else 1.0  # antialias: widen the kernel when shrinking
    taps: dict[int, float] = {}
    for k in range(math.floor(x - 2 / stretch) - 1, math.ceil(x + 2 / stretch) + 2):
        w = stretch * _ref_cubic(stretch * (x - k))
        if w:
            j = _ref_mirror(k, n_in) - 1
            taps[j] = taps.get(j, 0.0) + w
    total = sum(taps.values())
    return {j: w / total for j, w in taps.items()}


def _ref_imresize(img: np.ndarray, scale: float, out_h: int, out_w: int) -> np.ndarray:
    """Per-pixel MATLAB bicubic, written for clarity not speed."""
    h, w = img.shape[:2]
    out = np.zeros((out_h, out_w) + img.shape[2:])
    for i in range(out_h):
        ty = _ref_taps(i + 1, h, scale)
        for j in range(out_w):
            tx = _ref_taps(j + 1, w, scale)
            acc = 0.0
            for y, wy in ty.items():
                for x_, wx in tx.items():
                    acc = acc + wy * wx * img[y, x_].astype(np.float64)
            out[i, j] = acc
    return out


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_imresize_matches_bruteforce_upscale(scale: int) -> None:
    img = np.random.default_rng(scale).uniform(0, 255, size=(5, 7, 3))
    got = imresize(img, scale=scale)
    assert got.shape == (5 * scale, 7 * scale, 3)
    want = _ref_imresize(img, scale, 5 * scale, 7 * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_imresize_matches_bruteforce_downscale_antialias() -> None:
    img = np.random.default_rng(7).uniform(0, 255, size=(12, 9))
    got = imresize(img, scale=0.5)
    assert got.shape == (6, 5)
    np.testing.assert_allclose(got, _ref_imresize(img, 0.5, 6, 5), rtol=0, atol=1e-9)


def test_imresize_shapes_round_trip() -> None:
    img = np.random.default_rng(0).uniform(0, 255, size=(48, 36, 3))
    small = imresize(img, scale=1 / 4)
    assert small.shape == (12, 9, 3)
    assert imresize(small, scale=4).shape == img.shape
    assert imresize(img, scale=1 / 3).shape == (16, 12, 3)
    assert imresize(img, output_shape=(20, 50)).shape == (20, 50, 3)
    assert imresize(img[..., 0], scale=2).shape == (96, 72)
    assert imresize(np.zeros((85, 85)), scale=1 / 3).shape == (29, 29)  # ceil, no round-off


@pytest.mark.parametrize("scale", [2, 3, 4, 0.5])
def test_imresize_constant_stays_constant(scale: float) -> None:
    img = np.full((9, 11, 3), 123.0)
    np.testing.assert_allclose(imresize(img, scale=scale), 123.0, rtol=0, atol=1e-10)


def test_imresize_rejects_bad_arguments() -> None:
    img = np.zeros((4, 4))
    with pytest.raises(ValueError):
        imresize(img)
    with pytest.raises(ValueError):
        imresize(img, scale=2, output_shape=(8, 8))
    with pytest.raises(ValueError):
        imresize(np.zeros((2, 2, 2, 2)), scale=2)
