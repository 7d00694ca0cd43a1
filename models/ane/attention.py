"""Window attention in rank-4 tensors with the bias as per-head constants (ANE form).

Layout: the qkv map (B, 3C, H, W) is cut into windows by reshape/transpose only
(``(B*3C*nh, w, nw, w) -> (B*3C*nh, nw, w, w) -> (B, 3C, nW, T)``), so no tensor ever
has more than four axes. Each head then runs ``softmax(q k^T / 4 + bias) v`` on
(B, nW, T, 16) queries against (B, nW, 16, T) keys; the bias of that head (and of that
query chunk) is one constant (Tq, T) buffer, the exact addend of the score matmul.
Chunking the queries keeps the (B, nW, Tq, T) score tensor small; softmax runs over
keys, so chunks are independent and the result is the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.backends import SCALE, AttentionBackend
from ..attention.windows import HEAD_DIM, dense_bias, padded_size
from ..errors import ModelOptionError
from ..layers import reflect_pad

__all__ = ["AneAttention", "AneBiasConstants", "pad_to_windows_ane", "window_tokens", "window_map"]


class AneBiasConstants(nn.Module):
    """The dense bias of one attention block as non-persistent buffers ``h{head}_q{chunk}``.

    Why one buffer per (head, chunk): a slice of a big constant is not folded by
    coremltools above its size limit, so it would run as an op at every prediction;
    separate buffers become separate ready-made constants.
    """

    def __init__(self, table: torch.Tensor, window: int, query_chunk: int) -> None:
        super().__init__()
        dense = dense_bias(table.detach(), window)[0]  # (heads, T, T)
        self.heads = dense.shape[0]
        self.chunks = [(start, min(start + query_chunk, dense.shape[1])) for start in range(0, dense.shape[1], query_chunk)]
        for head in range(self.heads):
            for index, (start, stop) in enumerate(self.chunks):
                self.register_buffer(f"h{head}_q{index}", dense[head, start:stop].contiguous(), persistent=False)

    def get(self, head: int, chunk: int) -> torch.Tensor:
        return getattr(self, f"h{head}_q{chunk}")


def pad_to_windows_ane(x: torch.Tensor, window: int) -> torch.Tensor:
    """Reflect-pad bottom/right to window multiples; nothing at all when already multiples.

    Where the pad is smaller than the side (always, for tiles of at least half a window)
    this is one ``pad`` op; only smaller inputs fall back to the index gather
    (:func:`models.layers.reflect_pad`), which the ANE lint then names.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = padded_size(h, window) - h, padded_size(w, window) - w
    if ph == 0 and pw == 0:
        return x
    if ph < h and pw < w:
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    return reflect_pad(x, 0, ph, 0, pw)


def window_tokens(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, Hp, Wp) -> (B, C, nW, T): windows in raster order, tokens in raster order."""
    b, c, hp, wp = x.shape
    nh, nw = hp // window, wp // window
    x = x.reshape(b * c * nh, window, nw, window).transpose(1, 2)
    return x.reshape(b, c, nh * nw, window * window)


def window_map(tokens: torch.Tensor, hp: int, wp: int, window: int) -> torch.Tensor:
    """(B, C, nW, T) -> (B, C, Hp, Wp): the inverse of :func:`window_tokens`."""
    b, c = tokens.shape[0], tokens.shape[1]
    nh, nw = hp // window, wp // window
    x = tokens.reshape(b * c * nh, nw, window, window).transpose(1, 2)
    return x.reshape(b, c, hp, wp)


class AneAttention(AttentionBackend):
    """The ANE form of ESC's window attention (see the module doc).

    Needs the block's :class:`AneBiasConstants` as ``attn.ane_bias`` (attached by
    :func:`models.ane.ane_form`), whose chunks are the query chunks (the last one may be
    shorter than ``query_chunk``).
    """

    name = "ane"

    def __init__(self, query_chunk: int | None = None) -> None:
        if query_chunk is not None and query_chunk < 1:
            raise ModelOptionError(f"query_chunk must be a positive number of queries, got {query_chunk}")
        self.query_chunk = query_chunk

    def __call__(self, qkv: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        constants: AneBiasConstants | None = getattr(attn, "ane_bias", None)
        if constants is None:
            raise ModelOptionError("attention 'ane' needs the bias constants: build the form with models.ane.ane_form")
        h, w = int(qkv.shape[-2]), int(qkv.shape[-1])
        window, heads = attn.window, attn.heads
        padded = pad_to_windows_ane(qkv, window)
        tokens = window_tokens(padded, window)  # (B, 3C, nW, T)
        dim = heads * HEAD_DIM
        outs = []
        for head in range(heads):
            lo = head * HEAD_DIM
            q = tokens[:, lo:lo + HEAD_DIM].permute(0, 2, 3, 1) * SCALE            # (B, nW, T, 16)
            k = tokens[:, dim + lo:dim + lo + HEAD_DIM].permute(0, 2, 1, 3)        # (B, nW, 16, T)
            v = tokens[:, 2 * dim + lo:2 * dim + lo + HEAD_DIM].permute(0, 2, 3, 1)  # (B, nW, T, 16)
            parts = []
            for index, (start, stop) in enumerate(constants.chunks):
                q_part = q if len(constants.chunks) == 1 else q[:, :, start:stop]
                scores = q_part @ k + constants.get(head, index).to(q.dtype)
                parts.append(torch.softmax(scores, dim=-1) @ v)
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
            outs.append(out.permute(0, 3, 1, 2))                                   # (B, 16, nW, T)
        merged = window_map(torch.cat(outs, dim=1), padded.shape[-2], padded.shape[-1], window)
        return merged if merged.shape[-2:] == (h, w) else merged[:, :, :h, :w]

    def __repr__(self) -> str:
        return f"AneAttention(query_chunk={self.query_chunk})"
