"""ESC's window self-attention module (one per block)."""
from __future__ import annotations

import torch
from torch import nn

from .backends import AttentionBackend, SdpaBackend
from .windows import HEAD_DIM, dense_bias

# Precompute the dense bias only while it stays small: at w=32 and 4 heads it is 16 MB
# per block; esc_xl's w=48 with 12 heads would be 254 MB per block.
DENSE_BIAS_LIMIT_BYTES = 64 * 2**20


class WindowAttention(nn.Module):
    """``to_qkv`` (1x1) -> window attention with a learned relative bias -> ``to_out`` (1x1).

    The state-dict keys are upstream's: ``to_qkv``, ``to_out`` and the bias table
    ``relative_position_bias`` of shape (heads, (2w-1)^2). The computation between the
    two convolutions is delegated to an :class:`AttentionBackend`.
    """

    def __init__(self, dim: int, window: int, heads: int, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        if dim != heads * HEAD_DIM:
            raise ValueError(f"ESC uses head dimension {HEAD_DIM}: dim {dim} != heads {heads} x {HEAD_DIM}")
        self.window = window
        self.heads = heads
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        self.relative_position_bias = nn.Parameter(torch.zeros(heads, (2 * window - 1) ** 2))
        self.backend: AttentionBackend = backend or SdpaBackend()
        self.register_buffer("cached_bias", None, persistent=False)
        self.register_buffer("lowrank_q", None, persistent=False)
        self.register_buffer("lowrank_k", None, persistent=False)
        self.lowrank_report: dict[str, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.backend(self.to_qkv(x), self))

    def dense_bias(self) -> torch.Tensor:
        """(1, heads, w^2, w^2) bias: the deploy-time cache, else gathered from the table."""
        if self.cached_bias is not None:
            return self.cached_bias
        return dense_bias(self.relative_position_bias, self.window)

    def dense_bias_bytes(self) -> int:
        return self.heads * self.window ** 4 * 4

    @torch.no_grad()
    def precompute_bias(self) -> bool:
        """Cache the dense bias (a deploy-time fold); skipped above the size limit."""
        if self.dense_bias_bytes() > DENSE_BIAS_LIMIT_BYTES:
            return False
        self.cached_bias = dense_bias(self.relative_position_bias.detach(), self.window).contiguous()
        return True

    def drop_bias_cache(self) -> None:
        """Forget the dense bias, e.g. before export, so graphs hold the small table."""
        self.cached_bias = None

    @torch.no_grad()
    def lowrank_bias(self, rank: int | None, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
        """FlashBias factors (1, heads, w^2, r) for q and k, computed once by SVD in fp64.

        The q factor carries ``sqrt(head_dim)`` so that SDPA's 1/sqrt(16) scale cancels on
        it. ``r`` is rounded up to a multiple of 8 (zero columns) so flash kernels accept
        the augmented head dimension. The error of the approximation is recorded in
        :attr:`lowrank_report`.
        """
        key = (rank, energy)
        if self.lowrank_q is not None and self.lowrank_report and self.lowrank_report.get("key") == key:
            return self.lowrank_q, self.lowrank_k
        bias = dense_bias(self.relative_position_bias.detach().double(), self.window)[0]
        u, s, vh = torch.linalg.svd(bias)
        if rank is None:
            cumulative = torch.cumsum(s ** 2, dim=-1) / (s ** 2).sum(dim=-1, keepdim=True)
            rank = int((cumulative < energy).sum(dim=-1).max().item()) + 1
        rank = min(rank, s.shape[-1])
        u_r = u[..., :rank] * s[..., None, :rank]
        v_r = vh[..., :rank, :].transpose(-2, -1)
        approx = u_r @ v_r.transpose(-2, -1)
        padded = (rank + 7) // 8 * 8
        pad = padded - rank
        u_r = torch.nn.functional.pad(u_r, (0, pad)) * HEAD_DIM ** 0.5
        v_r = torch.nn.functional.pad(v_r, (0, pad))
        dtype = self.relative_position_bias.dtype
        self.lowrank_q = u_r.unsqueeze(0).to(dtype)
        self.lowrank_k = v_r.unsqueeze(0).to(dtype)
        self.lowrank_report = {
            "key": key,
            "rank": rank,
            "max_abs_error": float((approx - bias).abs().max()),
            "relative_fro_error": float(torch.linalg.norm(approx - bias) / torch.linalg.norm(bias).clamp_min(1e-30)),
        }
        return self.lowrank_q, self.lowrank_k

    def extra_repr(self) -> str:
        return f"window={self.window}, heads={self.heads}, backend={self.backend!r}"
