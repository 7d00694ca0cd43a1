"""Tests for runtimes.tiling: tiled == untiled with enough overlap, and the edges."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import GOLDEN_CASE, require_path
from torch import nn

from runtimes.tiling import _plan_axis, tiled_upscale, upscale_alpha

RADIUS = 6  # three 5x5 convolutions: 3 * 2 pixels of receptive-field radius
SCALE = 2

#: Differently batched or padded calls of the same convolutions may sum in another order
#: on another CPU's vector path: a few float32 ulps of values in [0, 1] (1 ulp = 6e-8).
ULP_ATOL = 1e-6


class FakeUpscaler(nn.Module):
    """Fixed random 5x5 conv stack (depth 3, zero padding) then nearest x2.

    Each output pixel depends on input pixels at most RADIUS away, so a tiled
    run must reproduce the untiled one exactly once overlap >= RADIUS.  It
    also records the shape of every call it gets.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        widths = [3, 6, 6, 3]
        self.weights = [torch.randn(o, i, 5, 5, generator=generator) * 0.2 for i, o in zip(widths, widths[1:])]
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        for k, weight in enumerate(self.weights):
            x = F.conv2d(x, weight, padding=2)
            if k < len(self.weights) - 1:
                x = torch.tanh(x)
        return F.interpolate(x, scale_factor=SCALE, mode="nearest")


class PointwiseUpscaler:
    """Receptive radius 0: padding can never change its output."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return F.interpolate(torch.sigmoid(3 * x - 1), scale_factor=SCALE, mode="nearest")


def make_image(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model() -> FakeUpscaler:
    return FakeUpscaler()


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny convolutions run ~100x slower multi-threaded on a 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------
# Equivalence with the untiled result
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap"),
    [
        (97, 61, 24, RADIUS),
        (97, 61, 32, RADIUS + 3),
        (40, 90, 16, RADIUS),  # tiny cores (16 - 12 = 4): many windows
        (7, 61, 24, RADIUS),  # shorter than the tile in one dimension only
        (64, 64, 32, RADIUS),
    ],
)
def test_tiled_equals_untiled_with_enough_overlap(
    model: FakeUpscaler, h: int, w: int, tile: int, overlap: int
) -> None:
    image = make_image(1, h, w)
    reference = model(image)
    model.calls.clear()
    tiled = tiled_upscale(model, image, SCALE, tile, overlap, batch_size=4)
    assert tiled.shape == (1, 3, h * SCALE, w * SCALE)
    assert len(model.calls) > 1  # it really was tiled
    assert all(shape[2:] == (min(tile, h), min(tile, w)) for shape in model.calls)
    torch.testing.assert_close(tiled, reference, atol=1e-5, rtol=0)


def test_not_enough_overlap_differs(model: FakeUpscaler) -> None:
    """Proves the equivalence test has teeth: without context, seams appear."""
    image = make_image(1, 64, 64)
    reference = model(image)
    tiled = tiled_upscale(model, image, SCALE, 32, 0)
    error = (tiled - reference).abs()
    assert error.max() > 1e-2
    # The damage sits within RADIUS of the seams (input row and column 32).
    seam = slice((32 - RADIUS) * SCALE, (32 + RADIUS) * SCALE)
    error[..., seam, :] = 0
    error[..., :, seam] = 0
    assert error.max() < 1e-5


@pytest.mark.parametrize(("h", "w"), [(1, 1), (7, 13), (13, 7)])
def test_small_images_take_one_call(model: FakeUpscaler, h: int, w: int) -> None:
    image = make_image(1, h, w)
    reference = model(image)
    model.calls.clear()
    out = tiled_upscale(model, image, SCALE, 16, RADIUS)
    assert model.calls == [(1, 3, h, w)]
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)


def test_untiled_is_one_call(model: FakeUpscaler) -> None:
    image = make_image(1, 97, 61)
    reference = model(image)
    model.calls.clear()
    out = tiled_upscale(model, image, SCALE, None, 0)
    assert model.calls == [(1, 3, 97, 61)]
    torch.testing.assert_close(out, reference, atol=ULP_ATOL, rtol=0)


def test_batch_size_does_not_change_the_result(model: FakeUpscaler) -> None:
    image = make_image(1, 97, 61)
    one = tiled_upscale(model, image, SCALE, 32, RADIUS, batch_size=1)
    calls_one = len(model.calls)
    model.calls.clear()
    three = tiled_upscale(model, image, SCALE, 32, RADIUS, batch_size=3)
    assert calls_one == 15  # windows 20 apart: 5 rows x 3 columns
    assert [c[0] for c in model.calls] == [3] * 5
    torch.testing.assert_close(one, three, atol=1e-6, rtol=0)


def test_several_images_batch_together(model: FakeUpscaler) -> None:
    images = make_image(2, 50, 37)
    references = torch.cat([model(images[i : i + 1]) for i in range(2)])
    model.calls.clear()
    out = tiled_upscale(model, images, SCALE, 32, RADIUS, batch_size=3)
    # 2 x 2 windows per image; the second call mixes both images.
    assert [c[0] for c in model.calls] == [3, 3, 2]
    torch.testing.assert_close(out, references, atol=1e-5, rtol=0)


def test_untiled_several_images_respects_batch_size(model: FakeUpscaler) -> None:
    images = make_image(3, 9, 11)
    out = tiled_upscale(model, images, SCALE, None, 0, batch_size=2)
    assert [c[0] for c in model.calls] == [2, 1]
    torch.testing.assert_close(out, model(images), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------
# Fixed shapes and multiples
# --------------------------------------------------------------------------


def test_fixed_shape_every_call_has_that_shape(model: FakeUpscaler) -> None:
    image = make_image(1, 97, 61)
    reference = model(image)
    model.calls.clear()
    out = tiled_upscale(model, image, SCALE, None, RADIUS, batch_size=2, fixed_shape=(32, 24))
    assert model.calls and all(c[2:] == (32, 24) for c in model.calls)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (7, 13), (20, 61)])
def test_fixed_shape_pads_small_images(h: int, w: int) -> None:
    fn = PointwiseUpscaler()
    image = make_image(2, h, w)
    out = tiled_upscale(fn, image, SCALE, None, 2, fixed_shape=(16, 16))
    assert all(c[2:] == (16, 16) for c in fn.calls)
    torch.testing.assert_close(out, fn(image), atol=ULP_ATOL, rtol=0)


def test_fixed_shape_padding_is_cropped_away(model: FakeUpscaler) -> None:
    """Padding only alters what the model sees beyond the image edge."""
    image = make_image(1, 20, 40)
    reference = model(image)
    out = tiled_upscale(model, image, SCALE, None, RADIUS, fixed_shape=(32, 32))
    assert out.shape == reference.shape
    # Rows further than RADIUS from the padded bottom edge are unaffected.
    keep = (20 - RADIUS) * SCALE
    torch.testing.assert_close(out[..., :keep, :], reference[..., :keep, :], atol=1e-5, rtol=0)


def test_padding_reflects_or_replicates() -> None:
    """Bottom/right padding mirrors the image, or repeats it when too small to mirror."""
    fn = PointwiseUpscaler()
    seen: list[torch.Tensor] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return fn(x)

    image = make_image(1, 5, 7)
    tiled_upscale(recording, image, SCALE, None, 0, fixed_shape=(8, 8))
    padded = seen.pop()
    assert torch.equal(padded[..., :5, :7], image)
    assert torch.equal(padded[..., 5:, :7], image[..., [3, 2, 1], :])  # reflect
    assert torch.equal(padded[..., :5, 7:], image[..., :, [5]])  # reflect
    pixel = make_image(1, 1, 1)
    tiled_upscale(recording, pixel, SCALE, None, 0, fixed_shape=(4, 4))
    assert torch.equal(seen.pop(), pixel.expand(1, 3, 4, 4))  # replicate


@pytest.mark.parametrize(("h", "w", "tile"), [(97, 61, 32), (7, 13, 16), (5, 50, None)])
def test_multiple_pads_each_call(h: int, w: int, tile: int | None) -> None:
    fn = PointwiseUpscaler()
    image = make_image(1, h, w)
    out = tiled_upscale(fn, image, SCALE, tile, 4, multiple=8)
    assert all(c[2] % 8 == 0 and c[3] % 8 == 0 for c in fn.calls)
    torch.testing.assert_close(out, fn(image), atol=ULP_ATOL, rtol=0)


def test_progress_bar(model: FakeUpscaler, capsys: pytest.CaptureFixture[str]) -> None:
    tiled_upscale(model, make_image(1, 40, 40), SCALE, 24, RADIUS, progress=True)
    assert "tiles" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Window placement
# --------------------------------------------------------------------------


def test_plan_axis_partitions_with_enough_context() -> None:
    for window in range(1, 21):
        for overlap in range(0, (window + 1) // 2):
            for length in range(1, 70):
                spans = _plan_axis(length, window, overlap)
                size = min(window, length)
                assert spans[0].keep_start == 0 and spans[-1].keep_end == length
                for span, following in zip(spans, spans[1:]):
                    assert span.keep_end == following.keep_start
                for s in spans:
                    assert 0 <= s.start and s.start + size <= length
                    assert s.start <= s.keep_start < s.keep_end <= s.start + size
                    if s.keep_start > 0:
                        assert s.keep_start - s.start >= overlap
                    if s.keep_end < length:
                        assert s.start + size - s.keep_end >= overlap


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 12, "overlap": 6}, "tile=12 must be > 2 \\* overlap"),
        ({"tile": 0}, "tile must be >= 1"),
        ({"overlap": -1}, "overlap must be >= 0"),
        ({"scale": 0}, "scale must be >= 1"),
        ({"scale": 2.0}, "scale must be an int"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": True}, "batch_size must be an int"),
        ({"tile": 30, "multiple": 8}, "multiple of multiple=8"),
        ({"tile": 16, "fixed_shape": (16, 16)}, "either tile or fixed_shape"),
        ({"tile": None, "fixed_shape": (16, 12), "overlap": 6}, "fixed_shape\\[1\\]=12 must be >"),
        ({"tile": None, "fixed_shape": (16,)}, "fixed_shape must be"),
    ],
)
def test_invalid_arguments(model: FakeUpscaler, kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"scale": SCALE, "tile": 16, "overlap": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        tiled_upscale(model, make_image(1, 20, 20), **args)  # type: ignore[arg-type]
    assert model.calls == []


def test_invalid_image_and_wrong_scale(model: FakeUpscaler) -> None:
    with pytest.raises(ValueError, match="\\(N, 3, H, W\\)"):
        tiled_upscale(model, torch.zeros(3, 8, 8), SCALE, None, 0)
    with pytest.raises(ValueError, match="non-empty"):
        tiled_upscale(model, torch.zeros(1, 3, 0, 8), SCALE, None, 0)
    with pytest.raises(ValueError, match="is scale=4 right"):
        tiled_upscale(model, make_image(1, 8, 8), 4, None, 0)


# --------------------------------------------------------------------------
# Alpha
# --------------------------------------------------------------------------


def test_upscale_alpha_is_channel_mean_of_replicated_plane(model: FakeUpscaler) -> None:
    alpha = make_image(2, 30, 41)[:, :1]
    out = upscale_alpha(model, alpha, SCALE, 24, RADIUS, batch_size=3)
    expected = model(alpha.expand(2, 3, 30, 41)).mean(dim=1, keepdim=True).clamp(0, 1)
    assert out.shape == (2, 1, 60, 82)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_upscale_alpha_clamps() -> None:
    def overshoot(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x * 3 - 1, scale_factor=SCALE, mode="nearest")

    out = upscale_alpha(overshoot, make_image(1, 9, 9)[:, :1], SCALE, None, 0)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_constant_alpha_skips_the_model(model: FakeUpscaler) -> None:
    alpha = torch.ones(2, 1, 9, 7)
    alpha[1] = 0.25
    out = upscale_alpha(model, alpha, SCALE, 16, RADIUS)
    assert model.calls == []
    assert out.shape == (2, 1, 18, 14)
    assert torch.equal(out[0], torch.ones(1, 18, 14)) and torch.equal(out[1], torch.full((1, 18, 14), 0.25))
    with pytest.raises(ValueError, match="tile=12"):
        upscale_alpha(model, alpha, SCALE, 12, RADIUS)
    with pytest.raises(ValueError, match="\\(N, 1, H, W\\)"):
        upscale_alpha(model, torch.ones(1, 3, 4, 4), SCALE, None, 0)


# --------------------------------------------------------------------------
# Window-aligned tiling
# --------------------------------------------------------------------------


def test_aligned_tiling_equals_untiled_for_a_finite_receptive_field(model: FakeUpscaler) -> None:
    """Aligned windows (starts on the grid, the last shortened to the edge) keep the tiler's guarantee."""
    image = make_image(2, 70, 53)
    reference = model(image)
    model.calls.clear()
    tiled = tiled_upscale(model, image, SCALE, 32, RADIUS, batch_size=3, align=8)
    assert len({c[2:] for c in model.calls}) > 1  # edge windows are shorter: several shapes
    assert all(c[0] <= 3 for c in model.calls)
    torch.testing.assert_close(tiled, reference, atol=1e-5, rtol=0)  # float summation order only


@pytest.mark.slow
def test_default_tiling_of_a_real_photo_stays_within_one_8bit_level(
        shared_dir: Path, golden_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """esc_light x4 (golden weights) on a 256x256 crop of a real photograph: the runner's
    tiling (224-pixel tiles on the 32-pixel window grid, 96 px of context: four tiles,
    seams across both axes) against one untiled call, compared as the 8-bit pictures a
    user gets. ESC pools each dynamic-kernel estimator's input globally, so the two cannot
    be equal; the promise is at most one level anywhere."""
    from PIL import Image

    from runtimes import load

    photo = require_path(shared_dir / "data" / "real_inputs" / "OST_009.png")
    crop = np.asarray(Image.open(photo).convert("RGB"))[200:456, 96:352]
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255
    runner = load(golden_dir / f"{GOLDEN_CASE}.pth")
    plan = runner.plan_tiles((256, 256), tile=224)
    assert (plan.tile, plan.overlap) == (224, 96)  # the default context, on the window grid
    tiled = runner.upscale(x, tile=224, batch_size=2)
    untiled = runner.upscale(x, tile=256)  # one call
    assert runner.timings.count == 2 + 1  # four tiles in two calls, then the whole crop

    def to_8bit(t: torch.Tensor) -> np.ndarray:
        return np.rint(t.clamp(0, 1).numpy() * 255).astype(np.int16)

    levels = np.abs(to_8bit(tiled) - to_8bit(untiled))
    identical = float((levels == 0).mean())
    with capsys.disabled():
        print(f"\n8-bit tiled vs untiled (esc_light x4, 256x256 crop of OST_009, tile 224, overlap 96): "
              f"max {levels.max()} level(s), {identical:.4%} of values identical, "
              f"float max abs {float((tiled - untiled).abs().max()):.2e}")
    assert levels.max() <= 1
