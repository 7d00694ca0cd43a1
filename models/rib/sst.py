"""SST: stacks of RIB transformer layers with growing windows and a pixel-shuffle tail."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import TilingBehaviour
from ..layers import ChannelLayerNorm, ConvFFN, pixel_shuffle, repeat_channels
from .attention import RIBAttention
from .config import RIBConfig
from .network import RIBNetwork


class SSTFFN(ConvFFN):
    """ESC's ConvFFN under SST's key names: the output 1x1 is ``agg`` (ESC: ``aggr``)."""

    def __init__(self, dim: int, exp_ratio: float) -> None:
        super().__init__(dim, exp_ratio)
        self.agg = self._modules.pop("aggr")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.gelu(self.proj(x))
        return self.agg(F.gelu(self.dwc(g)) + g)


class SSTLayer(nn.Module):
    """``x + attn(norm_attn(x))`` then ``x + ffn(norm_ffn(x))``."""

    def __init__(self, config: RIBConfig, window: int, heads: int, rank: int) -> None:
        super().__init__()
        self.norm_attn = ChannelLayerNorm(config.dim)
        self.attn = RIBAttention(config.dim, window, heads, rank, config.rib_hidden_dim, config.rib_n_freqs)
        self.norm_ffn = ChannelLayerNorm(config.dim)
        self.ffn = SSTFFN(config.dim, config.exp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x))
        return x + self.ffn(self.norm_ffn(x))


class SSTBlock(nn.Sequential):
    """Layers then a 3x3 conv, plus the block input (keys ``body.i.j``, the conv last)."""

    def __init__(self, config: RIBConfig) -> None:
        layers = [SSTLayer(config, *spec) for spec in zip(config.window_sizes, config.num_heads, config.ranks)]
        super().__init__(*layers, nn.Conv2d(config.dim, config.dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)

    def norm_conv_pairs(self) -> list[tuple[ChannelLayerNorm, nn.Conv2d]]:
        """``norm_ffn`` -> ``ffn.proj`` folds exactly; ``norm_attn`` does not (it feeds the
        gate's zero-padded depthwise 3x3 as well as ``to_qkv``)."""
        return [(layer.norm_ffn, layer.ffn.proj) for layer in self if isinstance(layer, SSTLayer)]


class PixelShuffleUpsampler(nn.Module):
    """leaky_relu(feature_conv) -> up_conv -> pixel shuffle -> final_conv, plus the nearest-upsampled input."""

    def __init__(self, dim: int, features: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.feature_conv = nn.Conv2d(dim, features, 3, padding=1)
        self.up_conv = nn.Conv2d(features, features * scale ** 2, 3, padding=1)
        self.final_conv = nn.Conv2d(features, 3, 3, padding=1)

    def forward(self, feat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        up = pixel_shuffle(self.up_conv(F.leaky_relu(self.feature_conv(feat), 0.1)), self.scale)
        # Nearest upsampling as repeat + pixel shuffle: every runtime computes it the same way.
        nearest = pixel_shuffle(repeat_channels(x, self.scale ** 2), self.scale)
        return self.final_conv(up) + nearest


class SST(RIBNetwork):
    """``proj`` -> ``body`` (blocks, LayerNorm, 3x3) + skip -> upsampler."""

    def __init__(self, config: RIBConfig) -> None:
        super().__init__(config)
        self.proj = nn.Conv2d(3, config.dim, 3, padding=1)
        self.body = nn.Sequential(*[SSTBlock(config) for _ in range(config.n_blocks)],
                                  ChannelLayerNorm(config.dim), nn.Conv2d(config.dim, config.dim, 3, padding=1))
        self.upsampler = PixelShuffleUpsampler(config.dim, config.intermediate_dim, config.scale)

    @property
    def blocks(self) -> list[SSTBlock]:
        return [m for m in self.body if isinstance(m, SSTBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.proj(x)
        return self.upsampler(feat + self.body(feat), x)

    def receptive_reach(self) -> int:
        """Input pixels one output pixel can depend on, in each direction (an upper bound).

        An attention layer reaches the rest of its window (w - 1), the gate's and the
        FFN's depthwise 3x3 one pixel each; each block adds its 3x3, the stem, the body's
        last conv and the upsampler's two low-resolution 3x3 convs one each.
        """
        per_block = sum(w + 1 for w in self.config.window_sizes) + 1
        return per_block * self.config.n_blocks + 4

    def tiling_behaviour(self) -> TilingBehaviour:
        align, reach = self.config.input_multiple, self.receptive_reach()
        return TilingBehaviour(
            supported=True, exact=True, align=align, context=reach,
            note=(f"no image-wide statistic: tiles on the {align}-pixel grid equal an untiled run once the "
                  f"context covers the receptive field ({reach} px, an upper bound; the output usually "
                  f"settles much sooner, unmeasured here)"))
