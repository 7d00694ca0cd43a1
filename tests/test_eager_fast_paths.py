"""Eager-only fast paths (issue 13): same numbers as the exportable forms, and never inside a captured graph.

Tolerances: the forms sum the same products in another order (fp32), so they agree to a
few ulps of the values involved; 1e-5 absolute on O(1) data leaves room for that and
nothing more.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.attention.backends import NaiveBackend, SdpaBackend
from models.attention.module import WindowAttention
from models.layers import (
    capturing_graph,
    dynamic_depthwise3x3,
    dynamic_depthwise3x3_grouped,
    reflect_pad,
)

ATOL = 1e-5


def test_grouped_dynamic_depthwise_equals_the_shifted_sum_for_a_batch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 11, generator=g)
    kernel = torch.randn(3, 5, 3, 3, generator=g)
    torch.testing.assert_close(dynamic_depthwise3x3_grouped(x, kernel), dynamic_depthwise3x3(x, kernel),
                               atol=ATOL, rtol=0)


def test_grouped_form_gives_way_to_the_shifts_when_traced() -> None:
    """A data-dependent group count must not reach a captured graph: traced, the grouped form is the shifts."""
    x, kernel = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)
    traced = torch.jit.trace(dynamic_depthwise3x3_grouped, (x, kernel))
    ops = {node.kind() for node in traced.graph.nodes()}
    assert "aten::_convolution" not in ops and "aten::conv2d" not in ops
    assert not capturing_graph()   # and eager is eager


def test_reflect_pad_without_padding_is_the_input_itself() -> None:
    x = torch.randn(1, 2, 4, 4)
    assert reflect_pad(x, 0, 0, 0, 0) is x
    padded = reflect_pad(x, 1, 2, 3, 1)
    # A pure gather: 1e-6 allows only rounding noise (values are O(1)); a wrong index is off by O(1).
    torch.testing.assert_close(padded, F.pad(x, (3, 1, 1, 2), mode="reflect"), atol=1e-6, rtol=0)


def test_reflect_pad_still_gathers_when_a_pad_is_positive() -> None:
    """The short cut only applies when every pad is a zero int; one non-zero pad pads."""
    x = torch.randn(1, 1, 3, 5)
    assert reflect_pad(x, 0, 0, 0, 1).shape == (1, 1, 3, 6)


def test_cpu_sdpa_fast_path_matches_the_naive_attention() -> None:
    torch.manual_seed(0)
    attn = WindowAttention(32, 8, 2).eval()
    with torch.no_grad():
        attn.relative_position_bias.normal_(0, 1)
    x = torch.randn(1, 32, 19, 21)   # padded to windows: both paths share the bookkeeping
    with torch.inference_mode():
        attn.backend = SdpaBackend()
        fast = attn(x)
        attn.backend = NaiveBackend()
        ref = attn(x)
    torch.testing.assert_close(fast, ref, atol=ATOL, rtol=0)


def test_grouped_form_reproduces_a_golden_vector(golden_dir) -> None:
    """The whole deployed network in the eager fast form still reproduces upstream's output (1e-4, the
    golden tolerance: fp32 summation order only)."""
    from models import load_model

    model = load_model(golden_dir / "esc_light_x4_35x35_b1.pth", attention="sdpa", deploy=True)
    model.set_dynamic_kernel_form("grouped")
    io = torch.load(golden_dir / "esc_light_x4_35x35_b1.io.pt", weights_only=True)
    with torch.inference_mode():
        out = model(io["lr"])
    assert (out - io["sr"]).abs().max().item() < 1e-4


def test_cpu_sdpa_takes_the_flash_kernel() -> None:
    """The point of the fast path: the math kernel (full scores + NaN guards) must not run on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    attn = WindowAttention(32, 8, 2).eval()
    x = torch.randn(1, 32, 16, 16)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        attn(x)
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_attention_math" not in names
