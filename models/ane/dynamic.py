"""The per-image dynamic 3x3 depthwise convolution in rank-4 tensors (ANE form).

Same sum as :func:`models.layers.dynamic_depthwise3x3_conv`, without its rank-5
reshape: a fixed one-hot depthwise conv makes the nine zero-padded shifts of every
channel (B, 9C, H, W), the per-image kernel multiplies them as a (B, 9C, 1, 1) tensor,
and a fixed grouped 1x1 conv of ones adds each channel's nine products. Both
convolutions have constant weights, which is what the Neural Engine needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import ConvAttention, DecomposedConvAttention
from ..layers import one_hot_taps

__all__ = ["AneConvAttention", "AneDecomposedConvAttention", "dynamic_depthwise3x3_rank4", "use_rank4_dynamic_kernels"]


def dynamic_depthwise3x3_rank4(x: torch.Tensor, kernel: torch.Tensor, taps: torch.Tensor,
                               ones: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) convolved per image with ``kernel`` (B, C, 3, 3), zero padding 1.

    ``taps``: :func:`models.layers.one_hot_taps` (9C, 1, 3, 3); ``ones``: (C, 9, 1, 1).
    """
    b, c = x.shape[0], x.shape[1]
    shifts = F.conv2d(x, taps.to(x.dtype), padding=1, groups=c)
    return F.conv2d(shifts * kernel.reshape(b, c * 9, 1, 1), ones.to(x.dtype), groups=c)


class _Rank4DynamicKernel:
    """Mixin overriding ``dynamic_depthwise`` of a ConvAttn module with the rank-4 form."""

    pdim: int

    def attach_rank4_constants(self) -> None:
        weight = next(self.parameters())  # type: ignore[attr-defined]
        self.register_buffer("ane_taps", one_hot_taps(self.pdim, weight.dtype).to(weight.device),  # type: ignore[attr-defined]
                             persistent=False)
        self.register_buffer("ane_ones", torch.ones(self.pdim, 9, 1, 1, dtype=weight.dtype, device=weight.device),  # type: ignore[attr-defined]
                             persistent=False)

    def dynamic_depthwise(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        return dynamic_depthwise3x3_rank4(x, kernel, self.ane_taps, self.ane_ones)  # type: ignore[attr-defined]


class AneConvAttention(_Rank4DynamicKernel, ConvAttention):
    """ESC's ConvAttn with the rank-4 dynamic 3x3."""


class AneDecomposedConvAttention(_Rank4DynamicKernel, DecomposedConvAttention):
    """ESC-FP's ConvAttn with the rank-4 dynamic 3x3."""


_ANE_CLASSES: dict[type, type] = {ConvAttention: AneConvAttention, DecomposedConvAttention: AneDecomposedConvAttention}


def use_rank4_dynamic_kernels(model: nn.Module) -> int:
    """Switch every ConvAttn module of ``model`` (in place) to the rank-4 dynamic 3x3; returns how many.

    Why a class switch: ``models.blocks`` chooses the dynamic form inside the module; the
    ANE subclasses only override that choice, so state dict, submodules and every other
    behaviour stay the module's own.
    """
    switched = 0
    for module in model.modules():
        ane_cls = _ANE_CLASSES.get(type(module))
        if ane_cls is not None:
            module.__class__ = ane_cls
            module.attach_rank4_constants()
            switched += 1
    return switched
