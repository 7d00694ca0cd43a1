"""Window bookkeeping for ESC's and the RIB models' self-attention, in rank <= 5 tensors.

Upstream partitions the qkv map with one rank-8 rearrange; Core ML allows rank 5 at
most, so partition and merge are done as two small reshape/transpose steps each.
"""
from __future__ import annotations

import torch

from ..layers import reflect_pad

HEAD_DIM = 16   # ESC's head dimension (partition/merge read theirs from the tensors)


def padded_size(size: int | torch.SymInt, window: int) -> int | torch.SymInt:
    """Smallest multiple of ``window`` that is >= ``size``."""
    return (size + window - 1) // window * window


def pad_to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of an NCHW map up to a multiple of ``window``.

    Padding the qkv map equals upstream's padding of the features before ``to_qkv``
    because a 1x1 convolution acts on each pixel alone.
    """
    h, w = x.shape[-2], x.shape[-1]
    return reflect_pad(x, 0, padded_size(h, window) - h, 0, padded_size(w, window) - w)


def partition(qkv: torch.Tensor, window: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (B, 3C, Hp, Wp) map -> q, k, v of shape (B * nW, heads, window^2, C / heads).

    Channels are laid out (qkv, head, d); windows and the tokens inside them are in
    raster order, as upstream's ``feat_to_win``. The head dimension comes from the channel
    count: 16 for ESC, 30 or 32 for SST, 16 for ESC-RIB.
    """
    b, c3, hp, wp = qkv.shape
    head_dim = c3 // (3 * heads)
    nh, nw = hp // window, wp // window
    tokens = window * window
    x = qkv.reshape(b * c3 * nh, window, nw, window).transpose(1, 2)
    x = x.reshape(b, 3 * heads, head_dim, nh * nw, tokens).permute(0, 3, 1, 4, 2)
    x = x.reshape(b * nh * nw, 3 * heads, tokens, head_dim)
    q, k, v = x.split(heads, dim=1)
    return q, k, v


def merge(out: torch.Tensor, batch: int, hp: int, wp: int, window: int) -> torch.Tensor:
    """(B * nW, heads, window^2, d) -> (B, heads * d, Hp, Wp); inverse of :func:`partition`."""
    heads, head_dim = out.shape[1], out.shape[-1]
    nh, nw = hp // window, wp // window
    x = out.reshape(batch, nh * nw, heads, window * window, head_dim).permute(0, 2, 4, 1, 3)
    x = x.reshape(batch * heads * head_dim * nh, nw, window, window).transpose(1, 2)
    return x.reshape(batch, heads * head_dim, hp, wp)


def relative_position_index(window: int, device: torch.device | None = None) -> torch.Tensor:
    """(window^2, window^2) index into the bias table for every (query, key) pair.

    Query (qh, qw) and key (kh, kw) read entry ``(kh - qh + w - 1) * (2w - 1) + (kw - qw + w - 1)``
    (upstream's layout, the transpose of Swin's).
    """
    t = torch.arange(window * window, device=device)
    row, col = t // window, t % window
    rel_h = row[None, :] - row[:, None] + window - 1
    rel_w = col[None, :] - col[:, None] + window - 1
    return rel_h * (2 * window - 1) + rel_w


def dense_bias(table: torch.Tensor, window: int) -> torch.Tensor:
    """Expand a (heads, (2w-1)^2) table into the dense (1, heads, w^2, w^2) bias."""
    index = relative_position_index(window, table.device)
    return table[:, index].unsqueeze(0)
