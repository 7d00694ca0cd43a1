"""ESC (also ESC-light and ESC-XL): one shared large kernel and a pixel-shuffle tail."""
from __future__ import annotations

import torch
from torch import nn

from ..base import ESCBase
from ..config import ESCConfig
from ..layers import ChannelLayerNorm, geometric_ensemble, pixel_shuffle, repeat_channels


class ESC(ESCBase):
    """``to_img(features) + input repeated s*s times`` then pixel shuffle.

    The stored ``plk_filter`` is used through its geometric ensemble; after
    :meth:`fold_large_kernels` the ensemble is the stored kernel itself.
    """

    def __init__(self, config: ESCConfig) -> None:
        super().__init__(config, decomposed=False)
        self.plk_filter = nn.Parameter(torch.zeros(config.pdim, config.pdim, config.kernel_size, config.kernel_size))
        if config.use_ln_last:
            self.ln_last = ChannelLayerNorm(config.dim)
        self.to_img = nn.Conv2d(config.dim, 3 * config.scale ** 2, 3, padding=1)
        self.kernel_folded = False

    def large_kernels(self) -> tuple[torch.Tensor, ...]:
        return (self.plk_filter if self.kernel_folded else geometric_ensemble(self.plk_filter),)

    @torch.no_grad()
    def fold_large_kernels(self) -> None:
        if not self.kernel_folded:
            self.plk_filter.copy_(geometric_ensemble(self.plk_filter))
            self.kernel_folded = True

    def pre_last(self, feat: torch.Tensor) -> torch.Tensor:
        return self.ln_last(feat) if self.config.use_ln_last else feat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.to_img(self.features(x)) + repeat_channels(x, self.scale ** 2)
        return pixel_shuffle(out, self.scale)
