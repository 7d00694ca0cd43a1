"""ESC's ConvAttn modules in the Neural Engine form: rank-4 dynamic 3x3, chunked to the budget.

Same sum as :func:`models.layers.dynamic_depthwise3x3_conv`, without its rank-5 reshape:
a fixed one-hot depthwise conv makes the nine zero-padded shifts of every channel
(B, 9C, H, W), the per-image kernel multiplies them as a (B, 9C, 1, 1) tensor, and a fixed
grouped 1x1 conv of ones adds each channel's nine products. Both convolutions have
constant weights, which is what the Neural Engine needs. At large tiles the nine shifts
of 16 channels (144 maps) exceed the tensor budget, so channels go in groups that fit.

Two contingencies (:mod:`.contingency`), off by default: the large kernel as 7x7 pieces,
the estimator's global mean as constant-weight convolutions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import ConvAttention, DecomposedConvAttention
from ..layers import one_hot_taps
from .budget import channel_groups
from .contingency import ConstantWeightMean, conv_in_pieces

__all__ = ["AneConvAttention", "AneDecomposedConvAttention", "dynamic_depthwise3x3_rank4", "use_rank4_dynamic_kernels"]

TAPS = 9


def dynamic_depthwise3x3_rank4(x: torch.Tensor, kernel: torch.Tensor, taps: torch.Tensor, ones: torch.Tensor,
                               budget: int | None = None) -> torch.Tensor:
    """``x`` (B, C, H, W) convolved per image with ``kernel`` (B, C, 3, 3), zero padding 1.

    ``taps``: :func:`models.layers.one_hot_taps` (9C, 1, 3, 3); ``ones``: (C, 9, 1, 1).
    ``budget``: bytes one (B, 9 c, H, W) fp16 shift tensor may take (channels go in groups).
    """
    b, c, h, w = x.shape
    flat = kernel.reshape(b, c * TAPS, 1, 1)
    groups = [(0, c)] if budget is None else channel_groups(c, h, w, budget, maps_per_channel=TAPS)
    outs = []
    for lo, hi in groups:
        part = x if (lo, hi) == (0, c) else x[:, lo:hi]
        shifts = F.conv2d(part, taps[TAPS * lo:TAPS * hi].to(x.dtype), padding=1, groups=hi - lo)
        scaled = shifts * (flat if (lo, hi) == (0, c) else flat[:, TAPS * lo:TAPS * hi])
        outs.append(F.conv2d(scaled, ones[lo:hi].to(x.dtype), groups=hi - lo))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


class _AneConvAttn:
    """Mixin for the ConvAttn classes: the rank-4 dynamic 3x3 and the two contingencies."""

    pdim: int
    ane_budget: int
    ane_pieces: bool

    def attach_ane_form(self, budget: int, pieces: bool, mean_as_conv: bool) -> None:
        weight = next(self.parameters())  # type: ignore[attr-defined]
        self.register_buffer("ane_taps", one_hot_taps(self.pdim, weight.dtype).to(weight.device),  # type: ignore[attr-defined]
                             persistent=False)
        self.register_buffer("ane_ones", torch.ones(self.pdim, TAPS, 1, 1, dtype=weight.dtype, device=weight.device),  # type: ignore[attr-defined]
                             persistent=False)
        self.ane_budget, self.ane_pieces = budget, pieces
        if mean_as_conv:
            estimator = self.dwc_proj if hasattr(self, "dwc_proj") else self.proj  # ESC / ESC-FP names
            estimator[0] = ConstantWeightMean()

    def dynamic_depthwise(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return dynamic_depthwise3x3_rank4(x, kernel, self.ane_taps, self.ane_ones, self.ane_budget)  # type: ignore[attr-defined]

    def large_kernel_conv(self, x: torch.Tensor, kernel: torch.Tensor, groups: int = 1) -> torch.Tensor:
        if self.ane_pieces:
            return conv_in_pieces(x, kernel, groups=groups)
        return super().large_kernel_conv(x, kernel, groups)  # type: ignore[misc]


class AneConvAttention(_AneConvAttn, ConvAttention):
    """ESC's ConvAttn in the ANE form."""


class AneDecomposedConvAttention(_AneConvAttn, DecomposedConvAttention):
    """ESC-FP's ConvAttn in the ANE form."""


_ANE_CLASSES: dict[type, type] = {ConvAttention: AneConvAttention, DecomposedConvAttention: AneDecomposedConvAttention}


def use_rank4_dynamic_kernels(model: nn.Module, budget: int, pieces: bool = False, mean_as_conv: bool = False) -> int:
    """Switch every ConvAttn module of ``model`` (in place) to the ANE form; returns how many.

    Why a class switch: ``models.blocks`` chooses the dynamic form inside the module; the
    ANE subclasses only override that choice, so state dict, submodules and every other
    behaviour stay the module's own.
    """
    switched = 0
    for module in model.modules():
        ane_cls = _ANE_CLASSES.get(type(module))
        if ane_cls is not None:
            module.__class__ = ane_cls
            module.attach_ane_form(budget, pieces, mean_as_conv)
            switched += 1
    return switched
