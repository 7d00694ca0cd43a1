"""Naive PyTorch reference for ESC's fused window attention.

This module defines the semantics that every accelerated implementation
(:mod:`models.kernels.window_attention_triton`) is tested against, and it is
the implementation an ONNX Runtime custom op calls on CPU. It reuses the
models' own window bookkeeping (:mod:`models.attention.windows`), so the
fused node and the PyTorch model cannot drift apart:

1. reflect-pad the ``qkv`` map at the bottom/right to a multiple of the window
   (as an index gather, see :func:`models.layers.reflect_indices`);
2. partition into ``w x w`` windows, raster order, tokens raster order inside;
3. per window and head: ``softmax(q k^T / sqrt(16) + bias) v`` in fp32, with
   the bias gathered from the ``(heads, (2w-1)^2)`` relative-position table;
4. window reverse, crop to ``(H, W)``, cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention.windows import HEAD_DIM, dense_bias, merge, pad_to_windows, partition

_ATTN_CHUNK_ELEMENTS = 1 << 26
"""Upper bound on fp32 score elements materialised at once (256 MiB).

The naive formulation materialises a ``(windows, heads, w^2, w^2)`` score
tensor, several GiB at HD sizes; windows are processed in chunks so the CPU
fallback stays usable inside an inference runtime.
"""


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
    padded = pad_to_windows(qkv, window)
    q, k, v = (t.float() for t in partition(padded, window, heads))
    bias = dense_bias(table.float(), window)

    n_windows, tokens = q.shape[0], window * window
    chunk = max(1, _ATTN_CHUNK_ELEMENTS // (heads * tokens * tokens))
    out = torch.cat([
        torch.softmax(q[i:i + chunk] @ k[i:i + chunk].transpose(-1, -2) * HEAD_DIM ** -0.5 + bias, dim=-1)
        @ v[i:i + chunk]
        for i in range(0, n_windows, chunk)
    ])
    merged = merge(out, batch, padded.shape[-2], padded.shape[-1], window)
    return merged[:, :, :height, :width].to(qkv.dtype).contiguous()
