"""Window attention in the Neural Engine's layout: channels first, one einsum per head, scores chunked.

The layout is the one Apple's Neural Engine ports use (ml-ane-transformers, "Deploying
Transformers on the Apple Neural Engine"): a (B, C, 1, S) tensor with the channels on
axis 1 and the sequence on the last axis. ESC has many windows, so the third axis holds
the windows: (B, C, nW, T) with T = w^2 tokens. Per attention block:

1. the features (B, C, H, W) are cut into windows once, *before* the projections (one
   reshape/transpose/reshape: :func:`window_tokens`), so the 3C-channel qkv map is never
   moved; the 1x1 projections are pointwise and run in token layout;
2. q, k and v come from three 1x1 convolutions (the rows of ``to_qkv``), the attention
   scale 1/4 folded into q's weights and bias (a power of two: exact in fp32 and fp16);
3. k is transposed once, to (B, T, nW, C); per head, q and v are channel slices and k a
   slice of its last axis, no permute;
4. per head and chunk: ``einsum("bchq,bkhc->bkhq")`` (scores with the keys on axis 1),
   the head's bias added as a constant (1, T, 1, Tq), ``softmax`` over axis 1 (the
   channel axis), ``einsum("bkhq,bchk->bchq")``; coremltools keeps both equations as MIL
   ``einsum`` ops (its ``nchw,nwhu->nchu`` form);
5. ``to_out`` runs in token layout, then the windows are put back (one transpose).

The score tensor of one (head, chunk) is (B, T keys, windows, queries); windows and
queries are chunked so it stays within the tensor budget (:mod:`.budget`): whole windows
per chunk while one window's scores fit, else one window and a slice of its queries.
Softmax runs over keys, so chunks are independent and the result is the same.

The bias comes from :meth:`WindowAttention.dense_bias` (the table, a precomputed cache or
FlashBias factors alike), stored per (head, query chunk) as separate constants: a slice
of one big constant is not folded by coremltools above its size limit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.backends import SCALE, AttentionBackend
from ..attention.module import WindowAttention
from ..attention.windows import HEAD_DIM, padded_size
from ..errors import ModelOptionError
from ..layers import reflect_pad
from .budget import FP16_BYTES, spans

__all__ = ["AneAttention", "AneWindowAttention", "pad_to_windows_ane", "query_chunk_for", "use_ane_attention",
           "window_map", "window_tokens"]

#: Query chunks below a whole window are multiples of this (64 bytes of fp16 on the last axis).
QUERY_ALIGN = 32


def pad_to_windows_ane(x: torch.Tensor, window: int) -> torch.Tensor:
    """Reflect-pad bottom/right to window multiples; nothing at all when already multiples.

    Where the pad is smaller than the side (always, for tiles of at least half a window)
    this is one ``pad`` op; only smaller inputs fall back to the index gather
    (:func:`models.layers.reflect_pad`), which the ANE lint then names. Padding the
    features equals padding the q/k/v maps: the projections are 1x1.
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


def query_chunk_for(tokens: int, budget: int) -> int:
    """Queries per score tensor: the whole window while one window's scores fit the budget,
    else the most queries that fit (a multiple of :data:`QUERY_ALIGN` when that many fit)."""
    if tokens * tokens * FP16_BYTES <= budget:
        return tokens
    chunk = max(1, budget // (tokens * FP16_BYTES))
    return chunk - chunk % QUERY_ALIGN if chunk >= QUERY_ALIGN else chunk


class AneWindowAttention(WindowAttention):
    """ESC's window attention in the Neural Engine's layout (see the module doc).

    Built by :func:`use_ane_attention` from a :class:`WindowAttention` (a class switch: the
    state dict and ``to_qkv`` / ``to_out`` stay the module's own). Non-persistent buffers:
    ``ane_wq/bq`` (q rows of ``to_qkv``, pre-scaled), ``ane_wk/bk``, ``ane_wv/bv`` and the
    bias ``ane_bias_h{head}_q{chunk}`` (1, T, 1, queries of the chunk).
    """

    budget: int
    query_spans: list[tuple[int, int]]

    @torch.no_grad()
    def attach_ane_constants(self, budget: int, dense_bias: torch.Tensor) -> None:
        """``dense_bias``: the block's (1, heads, T, T) bias, read before the class switch."""
        dim = self.heads * HEAD_DIM
        weight, bias = self.to_qkv.weight.detach(), self.to_qkv.bias.detach()
        scales = (SCALE, 1.0, 1.0)
        for index, name in enumerate("qkv"):
            rows = slice(index * dim, (index + 1) * dim)
            self.register_buffer(f"ane_w{name}", (weight[rows] * scales[index]).contiguous(), persistent=False)
            self.register_buffer(f"ane_b{name}", (bias[rows] * scales[index]).contiguous(), persistent=False)
        tokens = self.window * self.window
        self.budget = budget
        self.query_spans = spans(tokens, query_chunk_for(tokens, budget))
        dense = dense_bias.detach()[0]  # (heads, queries, keys)
        for head in range(self.heads):
            keys_first = dense[head].transpose(0, 1)  # (keys, queries)
            for index, (start, stop) in enumerate(self.query_spans):
                constant = keys_first[:, start:stop].reshape(tokens, 1, stop - start).unsqueeze(0).contiguous()
                self.register_buffer(f"ane_bias_h{head}_q{index}", constant, persistent=False)

    def bias_constant(self, head: int, chunk: int) -> torch.Tensor:
        return getattr(self, f"ane_bias_h{head}_q{chunk}")

    def windows_per_chunk(self, windows: int) -> int:
        """Windows per score tensor: as many as fit the budget next to the query chunk (at least one)."""
        tokens = self.window * self.window
        queries = self.query_spans[0][1] - self.query_spans[0][0]
        return max(1, min(windows, self.budget // (tokens * queries * FP16_BYTES)))

    def _project(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        weight, bias = getattr(self, f"ane_w{name}"), getattr(self, f"ane_b{name}")
        return F.conv2d(tokens, weight.to(tokens.dtype), bias.to(tokens.dtype))

    def _heads(self, q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, C, nWc, T) queries and values, (B, T, nWc, C) keys -> (B, C, nWc, T): every head."""
        outs = []
        for head in range(self.heads):
            lo, hi = head * HEAD_DIM, (head + 1) * HEAD_DIM
            q_h, kt_h, v_h = q[:, lo:hi], kt[..., lo:hi], v[:, lo:hi]
            parts = []
            for index, (start, stop) in enumerate(self.query_spans):
                q_part = q_h if len(self.query_spans) == 1 else q_h[..., start:stop]
                scores = torch.einsum("bchq,bkhc->bkhq", q_part, kt_h)
                scores = scores + self.bias_constant(head, index).to(scores.dtype)
                parts.append(torch.einsum("bkhq,bchk->bchq", torch.softmax(scores, dim=1), v_h))
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=3))
        return torch.cat(outs, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        padded = pad_to_windows_ane(x, self.window)
        tokens = window_tokens(padded, self.window)                 # (B, C, nW, T)
        q, k, v = (self._project(tokens, name) for name in "qkv")
        kt = k.transpose(1, 3)                                      # (B, T, nW, C): the one k transpose
        windows = tokens.shape[2]
        chunks = spans(windows, self.windows_per_chunk(windows))
        if len(chunks) == 1:
            out = self._heads(q, kt, v)
        else:
            out = torch.cat([self._heads(q[:, :, a:b], kt[:, :, a:b], v[:, :, a:b]) for a, b in chunks], dim=2)
        merged = window_map(self.to_out(out), padded.shape[-2], padded.shape[-1], self.window)
        return merged if merged.shape[-2:] == (h, w) else merged[:, :, :h, :w]


class AneAttention(AttentionBackend):
    """The back-end name the ANE form reports (``model.attention == "ane"``).

    The form's attention needs the features *before* ``to_qkv`` (it projects in token
    layout so the qkv map is never transposed), so it runs in
    :meth:`AneWindowAttention.forward`; the back-end seam (a qkv map in) is refused.
    """

    name = "ane"

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def __call__(self, qkv: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        raise ModelOptionError("the ANE form's attention runs in AneWindowAttention.forward on the features, not on a "
                               "qkv map; call the block's attention module (or build the form with models.ane.ane_form)")

    def __repr__(self) -> str:
        return f"AneAttention(budget={self.budget / 2**20:g} MiB)"


def use_ane_attention(modules: list[nn.Module], budget: int) -> None:
    """Switch each attention module (in place) to the ANE layout.

    The bias is read through the module's own ``dense_bias()`` before the switch, so any
    module with ``to_qkv``, ``to_out``, ``window``, ``heads`` and ``dense_bias()`` works
    (the table form, a cached bias, FlashBias factors).
    """
    for module in modules:
        bias = module.dense_bias()
        module.__class__ = AneWindowAttention
        module.attach_ane_constants(budget, bias)
        module.backend = AneAttention(budget)
