"""Window partition for any head dimension, in rank <= 5 tensors.

:mod:`models.attention.windows` fixes ESC's head dimension (16); SST's heads are 30 or
32 wide, so the same raster-order bookkeeping is done here with the head dimension read
from the channel count. Padding reuses :func:`models.attention.windows.pad_to_windows`.
"""
from __future__ import annotations

import torch


def split_windows(qkv: torch.Tensor, window: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (B, 3C, Hp, Wp) -> q, k, v of shape (B * nW, heads, window^2, C / heads).

    Channels are (qkv, head, d) and windows and tokens are in raster order, as upstream's
    ``feat_to_qkv``.
    """
    b, c3, hp, wp = qkv.shape
    head_dim = c3 // (3 * heads)
    rows, cols = hp // window, wp // window
    x = qkv.reshape(b * c3 * rows, window, cols, window).transpose(1, 2)
    x = x.reshape(b, 3 * heads, head_dim, rows * cols, window * window).permute(0, 3, 1, 4, 2)
    return x.reshape(b * rows * cols, 3 * heads, window * window, head_dim).split(heads, dim=1)


def join_windows(out: torch.Tensor, batch: int, hp: int, wp: int, window: int) -> torch.Tensor:
    """(B * nW, heads, window^2, d) -> (B, heads * d, Hp, Wp); inverse of :func:`split_windows`."""
    heads, head_dim = out.shape[1], out.shape[-1]
    rows, cols = hp // window, wp // window
    x = out.reshape(batch, rows * cols, heads, window * window, head_dim).permute(0, 2, 4, 1, 3)
    x = x.reshape(batch * heads * head_dim * rows, cols, window, window).transpose(1, 2)
    return x.reshape(batch, heads * head_dim, hp, wp)
