"""ESC-RIB: ESC's convolutional body with one RIB window attention (w = 64) per block."""
from __future__ import annotations

import torch
from torch import nn

from ..base import ESCBase
from ..blocks import Block
from ..esc import ESC
from ..layers import ChannelLayerNorm, pixel_shuffle, repeat_channels
from .attention import RIBAttention
from .config import RIBConfig
from .network import RIBNetwork


class RIBBlock(Block):
    """ESC's block (ConvFFN with expansion ``proj_ratio``, attention, ConvAttn/ConvFFN pairs)
    with the RIB attention in place of the relative-bias one."""

    def __init__(self, config: RIBConfig) -> None:
        super().__init__(config.dim, config.pdim, config.conv_blocks, config.window_sizes[0], config.num_heads[0],
                         config.exp_ratio, config.proj_ratio, use_lns=False, decomposed=False)
        self.attn = RIBAttention(config.dim, config.window_sizes[0], config.num_heads[0], config.ranks[0],
                                 config.rib_hidden_dim, config.rib_n_freqs)

    def norm_conv_pairs(self) -> list[tuple[ChannelLayerNorm, nn.Conv2d]]:
        """ESC's exact pairs less ``ln_attn``: its output also feeds the gate's zero-padded
        depthwise 3x3, where a folded LayerNorm bias would differ at the borders."""
        return [(norm, conv) for norm, conv in super().norm_conv_pairs() if conv is not self.attn.to_qkv]


class DirectUpsampler(nn.Module):
    """``up_conv`` (3x3, C -> 3 s^2) plus the input repeated s^2 times, then pixel shuffle."""

    def __init__(self, dim: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.up_conv = nn.Conv2d(dim, 3 * scale ** 2, 3, padding=1)

    def forward(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(self.up_conv(feat) + repeat_channels(x, self.scale ** 2), self.scale)


class ESCRIB(RIBNetwork):
    """Shallow conv -> RIB blocks sharing the ensembled large kernel -> LN + 3x3 + skip -> tail.

    The large-kernel handling is ESC's own (``large_kernels`` / ``fold_large_kernels``).
    """

    large_kernels = ESC.large_kernels
    fold_large_kernels = ESC.fold_large_kernels
    tiling_behaviour = ESCBase.tiling_behaviour  # inexact (global pooling), aligned to the window

    #: An estimate, not a measurement: ESC's measured 96 px at w = 32, doubled with the window.
    TILE_CONTEXT = 192

    def __init__(self, config: RIBConfig) -> None:
        super().__init__(config)
        self.plk_filter = nn.Parameter(torch.zeros(config.pdim, config.pdim, config.kernel_size, config.kernel_size))
        self.proj = nn.Conv2d(3, config.dim, 3, padding=1)
        self.blocks = nn.ModuleList([RIBBlock(config) for _ in range(config.n_blocks)])
        self.last = nn.Sequential(ChannelLayerNorm(config.dim), nn.Conv2d(config.dim, config.dim, 3, padding=1))
        self.upsampler = DirectUpsampler(config.dim, config.scale)
        self.kernel_folded = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        out = feat
        kernels = self.large_kernels()
        for block in self.blocks:
            out = block(out, *kernels)
        return self.upsampler(self.last(out) + feat, x)
