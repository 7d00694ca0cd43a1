"""Deploy-time reparameterisations, each exact and tested on its own.

They change how the network computes, never what: a deployed model reproduces the
checkpoint's outputs within float rounding.
"""
from __future__ import annotations

import torch

from .base import ESCBase
from .layers import ChannelLayerNorm


@torch.no_grad()
def fold_large_kernels(model: ESCBase) -> None:
    """Replace the large kernel by its geometric ensemble (ESC, ESC-Real), once."""
    model.fold_large_kernels()


@torch.no_grad()
def fold_layernorm_affine(model: ESCBase) -> int:
    """Fold each LayerNorm's affine into the 1x1 convolution that follows it.

    ``W (n * g + b) + c = (W diag g) n + (W b + c)`` holds exactly for a 1x1 convolution,
    and it survives reflect padding (a per-pixel affine commutes with it). Norms followed
    by a zero-padded 3x3 (``ln_out``, ``ln_last``) are left alone: their bias would differ
    at the borders. Returns the number of folded norms.
    """
    folded = 0
    for block in model.blocks:
        for norm, conv in block.norm_conv_pairs():
            _fold_affine_into_pointwise(norm, conv)
            folded += 1
    return folded


def _fold_affine_into_pointwise(norm: ChannelLayerNorm, conv: torch.nn.Conv2d) -> None:
    if conv.kernel_size != (1, 1) or conv.groups != 1:
        raise ValueError("LayerNorm affine folds only into a dense 1x1 convolution")
    gamma, beta = norm.drop_affine()
    weight = conv.weight.detach()
    bias_shift = (weight[:, :, 0, 0].double() @ beta.double()).to(weight.dtype)
    conv.weight.copy_(weight * gamma[None, :, None, None])
    conv.bias.add_(bias_shift)


@torch.no_grad()
def precompute_attention_bias(model: ESCBase) -> int:
    """Cache each block's dense (1, heads, w^2, w^2) bias; returns how many were cached."""
    return sum(attn.precompute_bias() for attn in model.attention_modules())
