"""Attention whose positional bias is a product of factors appended to q and k.

FlashBias (upstream ESC's ``attn_type: FlashBias``) and RIB (ESC-RIB, SST) both write the
bias of a window as ``F_q F_k^T`` with thin (tokens, r) factors, so that

    scale * q k^T + F_q F_k^T  ==  scale * ([q, F_q / scale] . [k, F_k])

and one mask-free attention over q and k extended by r channels computes the biased
scores exactly. Mask-free is what the fast kernels need (flash attention on GPU, CPU flash,
ONNX ``Attention`` without a mask, TensorRT's fused MHA, Core ML's SDPA). Factors here are
always in that *scaled* convention: the q factor already carries ``1 / scale``.

This module also turns a dense bias into factors by SVD, the way upstream's loader turns a
Flex-trained checkpoint into a FlashBias one: ``F_q = U_r sqrt(S_r)``, ``F_k = V_r sqrt(S_r)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Flash kernels take head dimensions in multiples of 8; q, k and v get zero columns up to one.
FLASH_MULTIPLE = 8


def extend(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``[x, factor]`` on the last axis; the (1, heads, N, r) factor is shared by every window."""
    return torch.cat([x, factor.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=-1)


def factored_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f_q: torch.Tensor, f_k: torch.Tensor,
                  scale: float | None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One mask-free SDPA over factor-extended q and k; v gets zero columns to the same width.

    Equal head dimensions (a multiple of 8) and no mask are what flash kernels require, so on
    a GPU this runs flash attention; the first ``d`` output channels are the attention result
    (the zero columns of v contribute nothing). ``scale`` None is SDPA's default, 1/sqrt of
    the padded width. ``compute_dtype`` casts q, k and v first, as
    upstream's FlashBias does with bfloat16; the result comes back in q's dtype.
    """
    head_dim = q.shape[-1]
    width = head_dim + f_q.shape[-1]
    pad = -width % FLASH_MULTIPLE
    q_ext = F.pad(extend(q, f_q), (0, pad))
    k_ext = F.pad(extend(k, f_k), (0, pad))
    v_ext = F.pad(v, (0, width + pad - head_dim))
    if compute_dtype is not None:
        q_ext, k_ext, v_ext = (t.to(compute_dtype) for t in (q_ext, k_ext, v_ext))
    out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=scale)
    return out[..., :head_dim].to(q.dtype)


@dataclass(frozen=True)
class FactorReport:
    """How well rank-``rank`` factors reproduce a dense bias (worst head, and all heads together)."""

    rank: int
    max_abs_error: float
    relative_fro_error: float

    def as_dict(self) -> dict[str, float]:
        return {"rank": self.rank, "max_abs_error": self.max_abs_error,
                "relative_fro_error": self.relative_fro_error}


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of every head's squared norm."""
    squares = singular_values.double() ** 2
    cumulative = torch.cumsum(squares, dim=-1) / squares.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return int((cumulative < energy).sum(dim=-1).max().item()) + 1


@torch.no_grad()
def factorise_bias(bias: torch.Tensor, rank: int | None = None,
                   energy: float = 0.999) -> tuple[torch.Tensor, torch.Tensor, FactorReport]:
    """(heads, N, N) dense bias -> unscaled factors (heads, N, r) with ``F_q F_k^T ~ bias``.

    The SVD runs in float64; the factors come back in the bias's dtype, split as upstream
    does (``sqrt(S)`` on each side, which keeps both factors at the same magnitude: safer in
    half precision than putting ``S`` on one side). ``rank`` None: the smallest one keeping
    ``energy`` of the squared norm (see :func:`rank_for_energy`).
    """
    dense = bias.detach().double()
    u, s, vh = torch.linalg.svd(dense)
    if rank is None:
        rank = rank_for_energy(s, energy)
    rank = max(1, min(rank, s.shape[-1]))
    root = s[..., :rank].sqrt()
    f_q = u[..., :rank] * root[..., None, :]
    f_k = vh[..., :rank, :].transpose(-2, -1) * root[..., None, :]
    approx = f_q @ f_k.transpose(-2, -1)
    report = FactorReport(
        rank=rank, max_abs_error=float((approx - dense).abs().max()),
        relative_fro_error=float(torch.linalg.norm(approx - dense) / torch.linalg.norm(dense).clamp_min(1e-300)))
    return f_q.to(bias.dtype), f_k.to(bias.dtype), report
