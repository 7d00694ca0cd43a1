"""ESC-Real: the real-world x4 model with a nearest+conv upsampler and an image skip branch."""
from __future__ import annotations

import torch
from torch import nn

from ..config import ESCConfig
from ..esc.arch import ESC
from ..layers import ReflectPadConv2d


class NearestConvUpsampler(nn.Sequential):
    """Nearest x2, conv, LReLU, nearest x2, conv, LReLU, conv, LReLU, conv -> RGB.

    Indices 1, 4, 6 and 8 hold the convolutions, as in the official checkpoints.
    """

    def __init__(self, dim: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(dim, 3, 3, padding=1),
        )


class ESCReal(ESC):
    """``to_img(features + skip(input))``; no image skip at the output.

    Shares ESC's large kernel and its ensemble fold; replaces the tail. The skip branch's
    depthwise 7x7 uses reflect padding that, unlike upstream's, also works on inputs
    smaller than 4 pixels (see :func:`models.layers.reflect_indices`).
    """

    def __init__(self, config: ESCConfig) -> None:
        if config.scale != 4:
            raise ValueError(f"ESC-Real's upsampler is fixed at x4, not x{config.scale}")
        super().__init__(config)
        dim = config.dim
        self.to_img = NearestConvUpsampler(dim)
        self.skip = nn.Sequential(
            nn.Conv2d(3, dim * 2, 1),
            ReflectPadConv2d(dim * 2, dim * 2, 7, padding=3, groups=dim * 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(dim * 2, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_img(self.features(x) + self.skip(x))
