"""fp16 safety from real pictures (models.fp16_safety): what it records, what it fixes exactly,
what it refuses.

Tolerances: the rescaled LayerNorm multiplies by a power of two, exact in float32, but the
model's outputs are computed through a different graph (one more multiply, a different
epsilon constant), so they are compared within 1e-5 relative to the output range.
"""
from __future__ import annotations

import pytest
import torch

from models.config import ESCConfig
from models.fp16_safety import (
    FP16_MAX,
    Fp16UnsafeError,
    PrescaledLayerNorm,
    fp16_safety_report,
    make_fp16_safe,
)
from models.layers import ChannelLayerNorm
from models.loader import build, randomise
from tests.conftest import SHARED_DIR, require_path


def tiny_esc(seed: int = 1) -> torch.nn.Module:
    """A small random ESC (1 block, window 8, dim 32): runs and converts in seconds."""
    torch.manual_seed(seed)
    model = build(ESCConfig("esc", 2, dim=32, pdim=16, kernel_size=7, n_blocks=1, conv_blocks=1, window_size=8,
                            num_heads=2))
    randomise(model)
    return model.eval()


def _pictures(n: int = 3, size: int = 16) -> list[torch.Tensor]:
    return [torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _scaled(model: torch.nn.Module, factor: float, *convs: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in convs:
            modules[name].weight.mul_(factor)
            modules[name].bias.mul_(factor)
    return model


def test_prescaled_layernorm_is_exact():
    """LN(a x) with epsilon a^2 eps equals LN(x): the fix changes no output."""
    torch.manual_seed(0)
    norm = ChannelLayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 5) * 1000
    got = PrescaledLayerNorm(norm, 2.0 ** -6)(x)
    torch.testing.assert_close(got, norm(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ChannelLayerNorm(8, eps=norm.eps)(x * 2.0 ** -6 + 1e-2), norm(x), atol=1e-3)


def test_prescaled_layernorm_scales_epsilon_where_it_matters():
    """Channel variance about epsilon, so epsilon shapes the output: the prescaled norm matches the
    original; the same norm with the same affine but epsilon left unscaled does not."""
    torch.manual_seed(0)
    norm = ChannelLayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 8, 5, 5) * norm.eps ** 0.5          # per-pixel variance ~ eps
    scale = 2.0 ** -6
    prescaled = PrescaledLayerNorm(norm, scale)
    torch.testing.assert_close(prescaled(x), norm(x), rtol=1e-5, atol=1e-5)
    eps_kept = ChannelLayerNorm(8, eps=norm.eps)
    eps_kept.weight, eps_kept.bias = norm.weight, norm.bias
    assert float((eps_kept(x * scale) - norm(x)).abs().max()) > 0.1   # same affine, epsilon not scaled


def test_report_records_inside_ops_and_passes_a_normal_model():
    report = fp16_safety_report(tiny_esc(), _pictures(), progress=False)
    assert report.safe and not report.problems, report.format()
    kinds = {qty for _, qty in report.ranges}
    assert {"square", "sum of squares", "accumulation", "sum before mean"} <= kinds
    assert ("blocks.0.ln_proj", "square") in report.ranges
    assert report.pictures == 3


def test_layernorm_overflow_is_named_and_fixed_exactly():
    model = _scaled(tiny_esc(), 512.0, "proj")
    report = fp16_safety_report(model, _pictures(), progress=False)
    assert not report.safe
    named = {(p.layer, p.quantity) for p in report.problems}
    assert ("blocks.0.ln_proj", "square") in named, report.format()
    assert all(p.layer == "blocks.0.ln_proj" for p in report.problems), "only the LayerNorm overflows"
    assert "blocks.0.ln_proj: square reaches" in report.format()

    safe, fixed = make_fp16_safe(model, _pictures(), progress=False)
    assert fixed.safe and not fixed.problems, fixed.format()
    assert isinstance(safe.blocks[0].ln_proj, PrescaledLayerNorm)
    assert type(model.blocks[0].ln_proj) is ChannelLayerNorm, "the caller's model is left alone"
    assert fixed.ranges[("blocks.0.ln_proj", "square")] <= FP16_MAX / 2
    x = _pictures(1, 24)[0]
    with torch.no_grad():
        ref, got = model(x), safe(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_overflow_outside_a_layernorm_is_refused_or_pinned_to_fp32():
    model = _scaled(tiny_esc(), 2.0 ** 17, "proj")  # the shallow conv's own output passes 65504
    with pytest.raises(Fp16UnsafeError, match=r"proj: output of conv2d reaches .*allow_fp32=True"):
        make_fp16_safe(model, _pictures(), progress=False)
    _, report = make_fp16_safe(model, _pictures(), allow_fp32=True, progress=False)
    assert "proj" in report.keep_fp32 and report.safe
    assert "fp32     proj" in report.format()


def test_bad_inputs_are_named():
    model = tiny_esc()
    with pytest.raises(Fp16UnsafeError, match="at least one picture"):
        fp16_safety_report(model, [], progress=False)
    with pytest.raises(Fp16UnsafeError, match=r"\(1, 3, h, w\)"):
        fp16_safety_report(model, [torch.rand(3, 8, 8)], progress=False)
    with pytest.raises(ValueError, match="headroom"):
        fp16_safety_report(model, _pictures(), headroom=0.5, progress=False)


@pytest.mark.slow
def test_golden_esc_light_is_fp16_safe_on_real_pictures():
    """The real checkpoint on Set5 and real-world crops: nothing near the fp16 limit."""
    from models import load_model
    from runtimes.imageio import read_image, to_tensor

    golden = require_path(SHARED_DIR / "golden" / "esc_light_x4_35x35_b1.pth")
    paths = sorted(require_path(SHARED_DIR / "data" / "Set5" / "LR_bicubic" / "X4").glob("*.png"))
    paths += sorted(p for p in require_path(SHARED_DIR / "data" / "real_inputs").iterdir() if p.suffix != "")
    pictures = [to_tensor(read_image(p).rgb)[..., :32, :32].contiguous() for p in paths[:8]]
    report = fp16_safety_report(load_model(golden, attention="naive"), pictures, progress=False)
    print(report.format())
    assert report.safe, report.format()
    assert max(report.ranges.values()) < FP16_MAX / 2
