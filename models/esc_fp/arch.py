"""ESC-FP: the large kernel decomposed into a 1x1 channel mix and a depthwise 13x13."""
from __future__ import annotations

import torch
from torch import nn

from ..base import ESCBase
from ..config import ESCConfig
from ..layers import BicubicUpsample, ChannelLayerNorm, pixel_shuffle


class ESCFP(ESCBase):
    """``pixel_shuffle(to_img(features)) + bicubic(input)``, with ``ln_last`` before ``last``.

    Its decomposed kernel has no ensemble to fold; the part that does fold, the dynamic
    3x3 kernel that upstream pads to 13x13 and adds to the shared spatial kernel, is
    split back out in :class:`~models.blocks.DecomposedConvAttention` for every mode.
    """

    def __init__(self, config: ESCConfig) -> None:
        super().__init__(config, decomposed=True)
        k = config.kernel_size
        self.lk_channel = nn.Parameter(torch.zeros(config.pdim, config.pdim, 1, 1))
        self.lk_spatial = nn.Parameter(torch.zeros(config.pdim, 1, k, k))
        self.ln_last = ChannelLayerNorm(config.dim)
        self.to_img = nn.Conv2d(config.dim, 3 * config.scale ** 2, 3, padding=1)
        self.upsample = BicubicUpsample(config.scale)

    def large_kernels(self) -> tuple[torch.Tensor, ...]:
        return self.lk_channel, self.lk_spatial

    def pre_last(self, feat: torch.Tensor) -> torch.Tensor:
        return self.ln_last(feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(self.to_img(self.features(x)), self.scale) + self.upsample(x)
