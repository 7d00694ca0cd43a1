"""Attention back-ends: the interchangeable computation inside a window attention.

Every back-end takes the un-padded qkv map (B, 3C, H, W) that ``to_qkv`` produced and
returns the attention result (B, C, H, W) before ``to_out``. Keeping the seam at the
map level (not at q/k/v) lets a fused kernel own the padding and the window
bookkeeping too, which is the whole point of fusing.

- ``naive``: matmul, add the dense bias, softmax, matmul (what the golden outputs use).
- ``sdpa``: ``F.scaled_dot_product_attention`` with the dense float bias as the mask.
- ``flex``: FlexAttention with the bias gathered from the table in a score modification.
- ``flashbias``: the bias factored per head by SVD into ``U V^T`` and appended to q and k,
  so a mask-free SDPA (a flash kernel on GPU) applies. Approximate below full rank.
- ``fused``: the Triton window-attention kernel (``models.kernels``), one custom op.
- ``coreml``: SDPA written the way coremltools converts it best (no explicit scale; the
  bias gathered in-graph from its small table, or dense): the Core ML exporter's form.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import AttentionBackendError, ModelOptionError
from ..layers import capturing_graph
from .windows import HEAD_DIM, merge, pad_to_windows, partition

if TYPE_CHECKING:
    from .module import WindowAttention

SCALE = 1.0 / math.sqrt(HEAD_DIM)


class AttentionBackend:
    """Base class; subclasses implement :meth:`__call__` on the qkv map."""

    name = "base"

    def __call__(self, qkv: torch.Tensor, attn: "WindowAttention") -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WindowedBackend(AttentionBackend):
    """Pads, partitions into windows, runs :meth:`core`, merges and crops."""

    def __call__(self, qkv: torch.Tensor, attn: "WindowAttention") -> torch.Tensor:
        b, _, h, w = qkv.shape
        padded = pad_to_windows(qkv, attn.window)
        q, k, v = partition(padded, attn.window, attn.heads)
        out = self.core(q, k, v, attn)
        merged = merge(out, b, padded.shape[-2], padded.shape[-1], attn.window)
        return merged[:, :, :h, :w]

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             attn: "WindowAttention") -> torch.Tensor:
        raise NotImplementedError


class NaiveBackend(WindowedBackend):
    """Explicit matmul / softmax / matmul; the softmax runs in fp32 for any input dtype."""

    name = "naive"

    def core(self, q, k, v, attn):
        scores = (q @ k.transpose(-2, -1)) * SCALE + attn.dense_bias().to(q.dtype)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        return probs @ v


class SdpaBackend(WindowedBackend):
    """``scaled_dot_product_attention`` with the dense bias as an additive float mask.

    On the CPU, eager PyTorch 2.13 picks the math kernel for a float mask: it materialises
    every window's (w^2, w^2) scores plus NaN guards (isneginf/all/where), which made the
    attention ~40% of an esc x4 call. The CPU flash kernel takes the same mask without the
    full score matrix (esc x4 at 128x128: one call 3.3 s -> 1.6 s, quiet 2-core CPU), so
    eager CPU calls ask for it first; captured graphs keep the plain op.
    """

    name = "sdpa"

    def core(self, q, k, v, attn):
        mask = attn.dense_bias().to(q.dtype)
        if q.device.type == "cpu" and not capturing_graph():
            # Fused kernels need a unit stride on the head dimension; the window partition leaves
            # it strided, and three small copies cost far less than the math kernel.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH], set_priority=True):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)


class FlexBackend(WindowedBackend):
    """FlexAttention with the relative-position bias read from the table per score.

    No (w^2, w^2) bias is ever materialised. Needs CUDA to be fast: on other devices it
    refuses unless ``allow_cpu=True`` (useful to check numbers, slow).
    """

    name = "flex"

    def __init__(self, compile: bool = True, allow_cpu: bool = False) -> None:
        self.compile = compile
        self.allow_cpu = allow_cpu
        self._fn: Callable | None = None

    def _flex(self) -> Callable:
        if self._fn is None:
            try:
                from torch.nn.attention.flex_attention import flex_attention
            except ImportError as exc:  # pragma: no cover - torch < 2.5
                raise AttentionBackendError(
                    "attention='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention); "
                    f"this torch is {torch.__version__}. Use attention='sdpa' instead.") from exc
            self._fn = torch.compile(flex_attention, dynamic=False) if self.compile else flex_attention
        return self._fn

    def core(self, q, k, v, attn):
        if q.device.type != "cuda" and not self.allow_cpu:
            raise AttentionBackendError(
                f"attention='flex' runs on CUDA only (the input is on {q.device.type}); "
                "FlexAttention is not exportable either. Use attention='sdpa' (or 'naive') here.")
        table = attn.relative_position_bias
        w = attn.window

        def score_mod(score, b, h, q_idx, kv_idx):
            rel = (kv_idx // w - q_idx // w + w - 1) * (2 * w - 1) + (kv_idx % w - q_idx % w + w - 1)
            return score + table[h, rel].to(score.dtype)

        return self._flex()(q, k, v, score_mod=score_mod, scale=SCALE)

    def __repr__(self) -> str:
        return f"FlexBackend(compile={self.compile})"


class FlashBiasBackend(WindowedBackend):
    """Low-rank bias appended to q and k so that a mask-free SDPA applies (FlashBias).

    ``scores = q k^T / 4 + U V^T`` equals ``[q, 4U] [k, V]^T / 4``, so SDPA runs on
    (16 + r)-dimensional q and k with the original v. The rank ``r`` is given, or the
    smallest one whose singular values keep ``energy`` of the bias's squared norm; the
    factors and the approximation error live on each attention module
    (:meth:`WindowAttention.lowrank_bias`). At full rank (w^2) the result is exact up to
    rounding; below it, outputs change (upstream: up to 0.05 dB PSNR).
    """

    name = "flashbias"

    def __init__(self, rank: int | None = None, energy: float = 0.999) -> None:
        if rank is not None and rank < 1:
            raise ValueError(f"flashbias rank must be >= 1, got {rank}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"flashbias energy must be in (0, 1], got {energy}")
        self.rank = rank
        self.energy = energy

    def core(self, q, k, v, attn):
        uq, vk = attn.lowrank_bias(self.rank, self.energy)
        n = q.shape[0]
        q_aug = torch.cat([q, uq.to(q.dtype).expand(n, -1, -1, -1)], dim=-1)
        k_aug = torch.cat([k, vk.to(k.dtype).expand(n, -1, -1, -1)], dim=-1)
        return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=SCALE)

    def __repr__(self) -> str:
        return f"FlashBiasBackend(rank={self.rank}, energy={self.energy})"


class FusedBackend(AttentionBackend):
    """The Triton fused window-attention kernel as one ``esc::window_attention`` op.

    Padding (by reflection index math), windowing, bias gather and online softmax all
    happen inside the kernel; see ``models/kernels``.
    """

    name = "fused"

    def __call__(self, qkv, attn):
        from ..kernels.ops import fused_window_attention

        return fused_window_attention(qkv, attn.relative_position_bias, attn.window, attn.heads)


def _toeplitz_index(window: int, device: torch.device) -> torch.Tensor:
    """(w*w,) flattened ``idx[q, k] = k - q + w - 1``: one axis of the relative offset."""
    r = torch.arange(window, device=device)
    return (r[None, :] - r[:, None] + (window - 1)).reshape(-1)


def table_bias(table: torch.Tensor, window: int) -> torch.Tensor:
    """The dense (1, heads, w^2, w^2) bias gathered from a (heads, (2w-1)^2) table.

    Two small gathers replace one (w^2, w^2) index: rows of the (2w-1, 2w-1) table by the
    vertical offset, then columns by the horizontal one; the result is (heads, qh, kh, qw,
    kw), permuted to (heads, qh, qw, kh, kw). Every intermediate stays at rank 5, which
    Core ML requires. Equals :func:`models.attention.windows.dense_bias`.
    """
    heads = table.shape[0]
    span = 2 * window - 1
    idx = _toeplitz_index(window, table.device)
    grid = table.reshape(heads, span, span)
    rows = grid.index_select(1, idx).reshape(heads, window, window, span)
    full = rows.index_select(3, idx).reshape(heads, window, window, window, window)
    return full.permute(0, 1, 3, 2, 4).reshape(1, heads, window * window, window * window)


class CoreMLBackend(WindowedBackend):
    """Window attention written for coremltools: SDPA with no explicit scale.

    coremltools maps SDPA to the fused iOS 18 ``scaled_dot_product_attention`` op only
    when no explicit scale is given (ESC's 1/sqrt(16) is SDPA's default for head
    dimension 16); for older targets it decomposes SDPA itself, so one graph serves all.
    ``bias="table"`` gathers the bias from the table in-graph (:func:`table_bias`: a
    small package, as long as the converter does not constant-fold the gather);
    ``"dense"`` uses the module's dense bias (the deploy-time cache when present).
    """

    name = "coreml"
    BIAS_MODES = ("table", "dense")

    def __init__(self, bias: str = "table") -> None:
        if bias not in self.BIAS_MODES:
            raise ModelOptionError(f"coreml attention bias must be one of {', '.join(self.BIAS_MODES)}, "
                                   f"got {bias!r}")
        self.bias = bias

    def core(self, q, k, v, attn):
        if q.shape[-1] != HEAD_DIM:  # SDPA's default scale must be ESC's 1/sqrt(16)
            raise AttentionBackendError(f"attention='coreml' needs head dimension {HEAD_DIM}, got {q.shape[-1]}")
        bias = table_bias(attn.relative_position_bias, attn.window) if self.bias == "table" else attn.dense_bias()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    def __repr__(self) -> str:
        return f"CoreMLBackend(bias={self.bias!r})"


BACKENDS: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (NaiveBackend, SdpaBackend, FlexBackend, FlashBiasBackend, FusedBackend, CoreMLBackend)
}


def make_backend(name: str | AttentionBackend, **options) -> AttentionBackend:
    """Build a back-end by name (``naive``, ``sdpa``, ``flex``, ``flashbias``, ``fused``, ``coreml``)."""
    if isinstance(name, AttentionBackend):
        return name
    key = name.lower()
    if key not in BACKENDS:
        raise AttentionBackendError(
            f"unknown attention back-end {name!r}; choose one of {', '.join(sorted(BACKENDS))}.")
    return BACKENDS[key](**options)
