"""Attention back-ends: the interchangeable computation inside a window attention.

Every back-end takes the un-padded qkv map (B, 3C, H, W) that ``to_qkv`` produced and
returns the attention result (B, C, H, W) before ``to_out``. Keeping the seam at the
map level (not at q/k/v) lets a fused kernel own the padding and the window
bookkeeping too, which is the whole point of fusing.

- ``naive``: matmul, add the dense bias, softmax, matmul (what the golden outputs use).
- ``sdpa``: ``F.scaled_dot_product_attention`` in the form the weights allow: the dense
  float bias as the mask for a bias table; mask-free over factor-extended q/k for a FlashBias
  model (:func:`.factored.factored_sdpa`: the flash kernel on GPU).
- ``flex``: FlexAttention with the bias read per score (from the table, or the FlashBias
  product).
- ``flashbias``: mask-free SDPA over factors: a FlashBias model's own, or a table's factored
  by SVD at a chosen rank (approximate below full rank). One path for both.
- ``fused``: the Triton window-attention kernel (``models.kernels``), one custom op; it
  gathers from a bias table, so FlashBias models are refused (use ``sdpa``).
- ``coreml``: SDPA written the way coremltools converts it best (no explicit scale; the
  bias gathered in-graph from its small table, or dense, or FlashBias factors appended to
  q and k): the Core ML exporter's form.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import AttentionBackendError, ModelOptionError
from ..layers import capturing_graph
from .factored import FLASH_MULTIPLE, factored_sdpa
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
        if not attn.has_table:   # FlashBias: no mask at all
            return factored_sdpa(q, k, v, *attn.factors(), SCALE)
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
        w = attn.window
        if not attn.has_table:   # FlashBias weights: the (heads, w^2, w^2) product, read per score
            bias = attn.dense_bias()[0]

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx].to(score.dtype)

            return self._flex()(q, k, v, score_mod=score_mod, scale=SCALE)
        table = attn.relative_position_bias

        def score_mod(score, b, h, q_idx, kv_idx):
            rel = (kv_idx // w - q_idx // w + w - 1) * (2 * w - 1) + (kv_idx % w - q_idx % w + w - 1)
            return score + table[h, rel].to(score.dtype)

        return self._flex()(q, k, v, score_mod=score_mod, scale=SCALE)

    def __repr__(self) -> str:
        return f"FlexBackend(compile={self.compile})"


class FlashBiasBackend(WindowedBackend):
    """FlashBias: the bias as factors appended to q and k, so one mask-free SDPA applies.

    A FlashBias model brings its factors (its weights); a table model's dense bias is
    factored by SVD (:meth:`WindowAttention.factors`) at ``rank``, or at the smallest rank
    whose singular values keep ``energy`` of its squared norm, with the error recorded in
    ``attn.lowrank_report``. At full rank (w^2) that is exact up to rounding; below it
    outputs change (upstream: up to 0.05 dB PSNR). ``precision="bf16"`` casts q, k and v to
    bfloat16 for the attention, as upstream runs it (its flash kernel's input type).
    """

    name = "flashbias"
    PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, rank: int | None = None, energy: float = 0.999, precision: str = "auto") -> None:
        if rank is not None and rank < 1:
            raise ModelOptionError(f"flashbias rank must be >= 1, got {rank}")
        if not 0.0 < energy <= 1.0:
            raise ModelOptionError(f"flashbias energy must be in (0, 1], got {energy}")
        if precision not in self.PRECISIONS:
            raise ModelOptionError(f"flashbias precision must be one of {', '.join(self.PRECISIONS)}, "
                                   f"got {precision!r}")
        self.rank = rank
        self.energy = energy
        self.precision = precision

    def core(self, q, k, v, attn):
        return factored_sdpa(q, k, v, *attn.factors(self.rank, self.energy), SCALE,
                             compute_dtype=self.PRECISIONS[self.precision])

    def __repr__(self) -> str:
        return f"FlashBiasBackend(rank={self.rank}, energy={self.energy}, precision={self.precision!r})"


class FusedBackend(AttentionBackend):
    """The Triton fused window-attention kernel as one ``esc::window_attention`` op.

    Padding (by reflection index math), windowing, bias gather and online softmax all
    happen inside the kernel; see ``models/kernels``.
    """

    name = "fused"

    def __call__(self, qkv, attn):
        from ..kernels.ops import fused_window_attention

        if not attn.has_table:
            raise AttentionBackendError(
                f"attention='fused' gathers its bias from a relative-position table, and this model's bias is "
                f"{attn.bias_form} factors: use attention='sdpa' (mask-free SDPA over the factors: the flash "
                f"kernel on GPU) or 'naive'.")
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
    ``"dense"`` uses the module's dense bias (the deploy-time cache when present). A
    FlashBias model has no table: with ``"table"`` its factors are appended to q and k
    (mask-free, as small as the factors), q pre-multiplied so that SDPA's default scale for
    the extended head dimension gives ESC's 1/4.
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
        if self.bias == "table" and not attn.has_table:
            return _default_scale_factored_sdpa(q, k, v, *attn.factors())
        bias = table_bias(attn.relative_position_bias, attn.window) if self.bias == "table" else attn.dense_bias()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    def __repr__(self) -> str:
        return f"CoreMLBackend(bias={self.bias!r})"


def _default_scale_factored_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f_q: torch.Tensor,
                                 f_k: torch.Tensor) -> torch.Tensor:
    """:func:`.factored.factored_sdpa` with no explicit scale (what coremltools fuses).

    SDPA's default scale is 1/sqrt(width) for the padded width, so q's side is multiplied
    by ``SCALE * sqrt(width)`` first (exactly 2 for ESC's 16 + 48 = 64 channels).
    """
    width = q.shape[-1] + f_q.shape[-1]
    width += -width % FLASH_MULTIPLE
    gain = SCALE * math.sqrt(width)
    return factored_sdpa(q * gain, k, v, f_q * gain, f_k, scale=None)


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
