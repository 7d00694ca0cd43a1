"""Naive PyTorch reference for ESC's fused window attention.

This module defines the semantics that every accelerated implementation
(:mod:`models.kernels.window_attention_triton`) is tested against, and it is
the implementation an ONNX Runtime custom op calls on CPU. It therefore
depends on torch only and spells every step out explicitly:

1. reflect-pad the ``qkv`` map at the bottom/right to a multiple of the window
   (as an index gather, see :func:`reflect_indices`);
2. partition into ``w x w`` windows, raster order, tokens raster order inside;
3. per window and head: ``softmax(q k^T / sqrt(16) + bias) v`` in fp32, with
   the bias gathered from the ``(heads, (2w-1)^2)`` relative-position table;
4. window reverse, crop to ``(H, W)``, cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HEAD_DIM = 16
"""ESC uses a fixed per-head channel count of 16."""

_ATTN_CHUNK_ELEMENTS = 1 << 26
"""Upper bound on fp32 score elements materialised at once (256 MiB).

The naive formulation materialises a ``(windows, heads, w^2, w^2)`` score
tensor, several GiB at HD sizes; windows are processed in chunks so the CPU
fallback stays usable inside an inference runtime.
"""


def reflect_indices(n: int, padded: int) -> Tensor:
    """Source indices of ``padded`` positions that reflect-pad a length-``n`` axis.

    Uses *iterated* reflection (numpy ``np.pad(mode="reflect")``): it equals
    torch's reflect padding whenever the pad is smaller than ``n`` and, unlike
    torch, stays defined when the pad is larger (tiny images with a 32/48
    window). Period ``2 * (n - 1)``; a length-1 axis repeats its only element.

    Args:
        n: length of the source axis (>= 1).
        padded: length of the padded axis (>= n).

    Returns:
        int64 tensor of shape ``(padded,)`` with values in ``[0, n)``.
    """
    if n < 1 or padded < n:
        raise ValueError(f"need 1 <= n <= padded, got n={n}, padded={padded}")
    positions = torch.arange(padded, dtype=torch.long)
    if n == 1:
        return torch.zeros_like(positions)
    period = 2 * (n - 1)
    folded = positions % period
    return torch.where(folded < n, folded, period - folded)


def relative_position_index(window: int) -> Tensor:
    """``(w^2, w^2)`` index into a ``(2w-1)^2`` bias table; rows are queries.

    Entry ``[q, k]`` is ``(ki - qi + w - 1) * (2w - 1) + (kj - qj + w - 1)``
    for query token ``q = qi * w + qj`` and key token ``k = ki * w + kj``.
    """
    coords = torch.arange(window, dtype=torch.long)
    rows = coords.repeat_interleave(window)
    cols = coords.repeat(window)
    d_row = rows[None, :] - rows[:, None] + window - 1
    d_col = cols[None, :] - cols[:, None] + window - 1
    return d_row * (2 * window - 1) + d_col


def check_window_attention_args(qkv: Tensor, table: Tensor, window: int, heads: int) -> None:
    """Raise ``ValueError`` unless the arguments fit the ``esc::window_attention`` contract.

    Shared by the reference, the Triton launcher and the op's fake kernel so
    every path rejects the same inputs with the same message. Only metadata is
    inspected, so it also runs on fake tensors under ``torch.export``.
    """
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be (B, 3*C, H, W), got shape {tuple(qkv.shape)}")
    if qkv.shape[1] != 3 * HEAD_DIM * heads:
        raise ValueError(
            f"qkv has {qkv.shape[1]} channels, expected 3 * 16 * heads = {3 * HEAD_DIM * heads} "
            f"(q, k, v x {heads} heads x head dim 16)"
        )
    if qkv.shape[2] < 1 or qkv.shape[3] < 1:
        raise ValueError(f"qkv spatial size must be >= 1x1, got {tuple(qkv.shape[2:])}")
    n_bias = (2 * window - 1) ** 2
    if tuple(table.shape) != (heads, n_bias):
        raise ValueError(
            f"table must be (heads, (2*window-1)**2) = {(heads, n_bias)} for window={window}, "
            f"got {tuple(table.shape)}"
        )
    if not qkv.is_floating_point() or not table.is_floating_point():
        raise ValueError(f"qkv and table must be floating point, got {qkv.dtype} and {table.dtype}")
    if qkv.device != table.device:
        raise ValueError(f"qkv and table must be on one device, got {qkv.device} and {table.device}")


def window_attention_reference(qkv: Tensor, table: Tensor, window: int, heads: int) -> Tensor:
    """Reflect-padded, windowed multi-head attention with relative-position bias.

    Args:
        qkv: ``(B, 3*C, H, W)`` output of ESC's ``to_qkv`` 1x1 conv, channel
            index ``s*C + h*16 + d`` for ``s`` in (q, k, v), ``C = heads*16``.
        table: ``(heads, (2*window-1)**2)`` relative-position bias table.
        window: window size ``w`` (a multiple of 16).
        heads: number of attention heads.

    Returns:
        ``(B, C, H, W)`` attention output (channel ``h*16 + d``) in ``qkv.dtype``.
    """
    check_window_attention_args(qkv, table, window, heads)
    batch, _, height, width = qkv.shape
    device = qkv.device
    n_rows, n_cols = math.ceil(height / window), math.ceil(width / window)
    rows = reflect_indices(height, n_rows * window).to(device)
    cols = reflect_indices(width, n_cols * window).to(device)
    padded = qkv.index_select(2, rows).index_select(3, cols)

    tokens = window * window
    # (B, 3, heads, 16, nr, w, nc, w) -> (3, B, nr, nc, heads, w, w, 16)
    parts = padded.reshape(batch, 3, heads, HEAD_DIM, n_rows, window, n_cols, window)
    parts = parts.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, -1, heads, tokens, HEAD_DIM).float()
    q, k, v = parts.unbind(0)
    bias = table.float()[:, relative_position_index(window).to(device)]

    n_windows = q.shape[0]
    chunk = max(1, _ATTN_CHUNK_ELEMENTS // (heads * tokens * tokens))
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5
    for start in range(0, n_windows, chunk):
        sl = slice(start, start + chunk)
        scores = torch.matmul(q[sl], k[sl].transpose(-1, -2)) * scale + bias
        out[sl] = torch.matmul(torch.softmax(scores, dim=-1), v[sl])

    # (B, nr, nc, heads, w, w, 16) -> (B, heads, 16, nr, w, nc, w)
    out = out.reshape(batch, n_rows, n_cols, heads, window, window, HEAD_DIM)
    out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(batch, heads * HEAD_DIM, n_rows * window, n_cols * window)
    return out[:, :, :height, :width].to(qkv.dtype).contiguous()
