"""The RIB window attention layer (upstream ``WindowAttention2D`` with ``attn_type='RIB'``)."""
from __future__ import annotations

import torch
from torch import nn

from ..attention.windows import pad_to_windows
from .backends import RIBBackend, SdpaBackend
from .positional import positional_factors, window_features


class RIBAttention(nn.Module):
    """gate(x) * attention(x) -> ``to_out``, with rank-factorised positional bias.

    State-dict keys are upstream's: ``to_hidden``, ``hidden_b``, ``to_q``, ``to_k``
    (the bias MLP), ``to_qkv``, ``to_out`` and ``gate.0`` / ``gate.1`` (depthwise 3x3 and
    1x1, then a sigmoid). The gate sees the un-padded input; the input is reflect-padded to
    whole windows before ``to_qkv``, as upstream does (a third of the data of padding the
    qkv map, the same numbers), and the attention output is cropped back.
    """

    def __init__(self, dim: int, window: int, heads: int, rank: int, hidden: int = 32, n_freqs: int = 10) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.window = window
        self.heads = heads
        self.head_dim = dim // heads
        self.to_hidden = nn.Parameter(torch.zeros(2 + 4 * n_freqs, hidden))
        self.hidden_b = nn.Parameter(torch.zeros(1, hidden))
        self.to_q = nn.Parameter(torch.zeros(heads, hidden, rank))
        self.to_k = nn.Parameter(torch.zeros(heads, hidden, rank))
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(dim, dim, 1), nn.Sigmoid())
        self.register_buffer("features", window_features(window, n_freqs), persistent=False)
        self.register_buffer("factor_q", None, persistent=False)
        self.register_buffer("factor_k", None, persistent=False)
        self.backend: RIBBackend = SdpaBackend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        out = self.backend(self.to_qkv(pad_to_windows(x, self.window)), self)
        return self.to_out(out[:, :, :h, :w] * self.gate(x))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, heads, w^2, r) q and k factors: the deploy-time constants, else from the MLP."""
        if self.factor_q is not None:
            return self.factor_q, self.factor_k
        return positional_factors(self.features, self.to_hidden, self.hidden_b, self.to_q, self.to_k, self.head_dim)

    @torch.no_grad()
    def precompute_bias(self) -> bool:
        """Deploy fold: keep the factors as constants (scales folded in); they depend on the window only.

        Named as ESC's bias cache so that :meth:`models.base.ESCBase.deploy` applies as is.
        """
        self.factor_q, self.factor_k = (f.contiguous() for f in self.factors())
        return True

    def drop_bias_cache(self) -> None:
        """Forget the constant factors (back to computing them from the MLP)."""
        self.factor_q = self.factor_k = None

    def extra_repr(self) -> str:
        return f"window={self.window}, heads={self.heads}, rank={self.to_q.shape[-1]}, backend={self.backend!r}"
