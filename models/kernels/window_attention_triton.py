"""Fused Triton kernel for ESC's reflect-padded window attention.

One kernel replaces the eager pipeline ``reflect pad -> window partition ->
bias gather -> attention -> window reverse -> crop``:

* q, k and v are gathered straight from the NCHW ``qkv`` map; the reflect
  padding is index math (iterated reflection, see
  :func:`models.layers.reflect_indices`), so neither a padded copy
  nor a partitioned copy of the map is ever written;
* the relative-position bias is gathered from the ``(heads, (2w-1)^2)`` table
  per ``BLOCK_M x BLOCK_N`` tile, never as a ``w^2 x w^2`` tensor;
* softmax is flash-style (online, exp2-based, fp32 statistics and
  accumulator), so the ``w^2 x w^2`` score matrix is never materialised either;
* the result is stored directly at its ``(B, C, H, W)`` position, masked to the
  un-padded region (padded keys still take part, padded queries are dropped).

Semantics are defined by :func:`models.kernels.reference.window_attention_reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import grid_limit_problem, launch_grid
from .reference import HEAD_DIM, check_window_attention_args
from .triton_support import require_triton

require_triton(triton.__version__)  # before triton.knobs: an old Triton gets a message, not an AttributeError
_LOG2E = math.log2(math.e)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

INTERPRETER_MODE: bool = bool(triton.knobs.runtime.interpret)
"""Whether ``@triton.jit`` below builds an interpreted (CPU) kernel.

Triton fixes this per process: ``TRITON_INTERPRET`` is read when a function
is decorated, and ``triton.language``'s own helpers (``tl.zeros``, ``tl.sum``,
...) are decorated when ``triton`` is first imported. It must therefore be set
before the first ``import triton``; an interpreted kernel then runs on CPU
tensors (and on CUDA ones, via host copies), a compiled one on GPU tensors only.
"""


@triton.jit
def _window_attention_fwd(
    qkv_ptr,
    table_ptr,
    out_ptr,
    height,
    width,
    row_period,
    col_period,
    n_win_cols,
    heads,
    qk_scale,
    bias_scale,
    WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """One program: ``BLOCK_M`` query tokens of one window, one (batch, head).

    Grid: ``(WINDOW**2 // BLOCK_M, n_windows, batch * heads)``. Tokens are raster
    order inside a window, windows raster order over the padded map. A padded
    coordinate ``p`` reads source ``(n-1) - |(n-1) - p % period|`` with
    ``period = max(2(n-1), 1)``, which is iterated reflection in one line
    (``row_period``/``col_period`` come from the host).

    ``qk_scale`` is ``HEAD_DIM**-0.5 * log2(e)`` and ``bias_scale`` is
    ``log2(e)``: scores live in the log2 domain so the softmax uses ``exp2``.
    Both dots use ``input_precision="ieee"``: it only matters for fp32 inputs,
    where the default TF32 would miss the fp32 accuracy target. ``DOT_DTYPE``
    is the input dtype on GPU and fp32 under the interpreter, whose ``tl.dot``
    cannot multiply bf16 (it stores bf16 as uint16). The upcast is exact
    (16-bit products fit fp32, and ``p`` is still rounded to the input dtype
    first), so the interpreter computes what a 16-bit tensor-core dot with
    fp32 accumulation computes, up to summation order.
    """
    pid_m = tl.program_id(0)
    pid_win = tl.program_id(1)
    pid_bh = tl.program_id(2)
    batch = pid_bh // heads
    head = pid_bh % heads
    win_row0 = (pid_win // n_win_cols) * WINDOW
    win_col0 = (pid_win % n_win_cols) * WINDOW

    # Channel-plane offsets are int64: (batch * 3C + channel) * H * W overflows
    # int32 at 4K inputs. (height/width may arrive as constexpr 1, hence the
    # int64 tensor on the left of every product.)
    channels = heads * HEAD_DIM
    q_chan = batch.to(tl.int64) * 3 * channels + head * HEAD_DIM
    q_base = qkv_ptr + q_chan * height * width
    k_base = qkv_ptr + (q_chan + channels) * height * width
    v_base = qkv_ptr + (q_chan + 2 * channels) * height * width
    out_base = out_ptr + (batch.to(tl.int64) * channels + head * HEAD_DIM) * height * width
    bias_base = table_ptr + head * ((2 * WINDOW - 1) * (2 * WINDOW - 1))
    d_offsets = tl.arange(0, HEAD_DIM).to(tl.int64) * height * width

    tokens_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_i = tokens_m // WINDOW
    q_j = tokens_m % WINDOW
    q_row = win_row0 + q_i
    q_col = win_col0 + q_j
    # The bias index (ki - qi + w-1) * (2w-1) + (kj - qj + w-1) separates into
    # k_lin - q_lin + 2w(w-1) with *_lin = i * (2w-1) + j: one add per score.
    q_lin = q_i * (2 * WINDOW - 1) + q_j
    q_src_row = (height - 1) - tl.abs((height - 1) - q_row % row_period)
    q_src_col = (width - 1) - tl.abs((width - 1) - q_col % col_period)
    q = tl.load(q_base + (q_src_row * width + q_src_col)[:, None] + d_offsets[None, :]).to(DOT_DTYPE)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start_n in range(0, WINDOW * WINDOW, BLOCK_N):
        tokens_n = start_n + tl.arange(0, BLOCK_N)
        k_i = tokens_n // WINDOW
        k_j = tokens_n % WINDOW
        k_lin = k_i * (2 * WINDOW - 1) + k_j + 2 * WINDOW * (WINDOW - 1)
        k_src_row = (height - 1) - tl.abs((height - 1) - (win_row0 + k_i) % row_period)
        k_src_col = (width - 1) - tl.abs((width - 1) - (win_col0 + k_j) % col_period)
        k_pix = k_src_row * width + k_src_col
        k_t = tl.load(k_base + d_offsets[:, None] + k_pix[None, :]).to(DOT_DTYPE)
        v = tl.load(v_base + k_pix[:, None] + d_offsets[None, :]).to(DOT_DTYPE)

        bias = tl.load(bias_base + (k_lin[None, :] - q_lin[:, None])).to(tl.float32)
        scores = tl.dot(q, k_t, input_precision="ieee") * qk_scale + bias * bias_scale

        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # p is rounded to the input precision, as a 16-bit tensor-core dot needs.
        p_in = p.to(out_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision="ieee")
        m_i = m_new

    out = acc / l_i[:, None]
    keep = (q_row < height) & (q_col < width)
    out_ptrs = out_base + (q_row * width + q_col)[:, None] + d_offsets[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=keep[:, None])


def _check_block(name: str, block: int, tokens: int) -> None:
    """``tl.arange`` needs a power of two, ``tl.dot`` at least 16 rows/cols."""
    if block < 16 or block & (block - 1) or tokens % block:
        raise ValueError(f"{name} must be a power of two >= 16 dividing window**2 = {tokens}, got {block}")


def window_attention_triton(
    qkv: Tensor,
    table: Tensor,
    window: int,
    heads: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """Fused ESC window attention; same contract as the reference.

    GPU tensors run the compiled kernel. CPU tensors need Triton's interpreter
    (numpy, slow: meant for tests on machines without a GPU), i.e.
    ``TRITON_INTERPRET=1`` set before ``triton`` was first imported; see
    :data:`INTERPRETER_MODE`.

    Args:
        qkv: ``(B, 3*heads*16, H, W)`` fp16/bf16/fp32 map, channel ``s*C + h*16 + d``.
        table: ``(heads, (2*window-1)**2)`` bias table, any float dtype
            (fp32 with fp16 ``qkv`` is fine: the bias is added in fp32).
        window: window size, a positive multiple of 16.
        heads: number of heads.
        block_m: query tokens per program (power of two >= 16 dividing window**2);
            default 64 compiled, ``window**2`` interpreted (the interpreter's cost is per
            program and step, so one program per window keeps CPU runs short).
        block_n: key tokens per inner-loop step (same constraint and defaults).

    Returns:
        ``(B, heads*16, H, W)`` tensor in ``qkv.dtype``.
    """
    check_window_attention_args(qkv, table, window, heads)
    if window % 16:
        raise ValueError(f"window must be a multiple of 16 (tl.dot tiles), got {window}")
    if qkv.dtype not in _TL_DTYPES:
        raise ValueError(f"qkv dtype must be one of {tuple(_TL_DTYPES)}, got {qkv.dtype}")
    tokens = window * window
    default_block = tokens if INTERPRETER_MODE else 64
    block_m = default_block if block_m is None else block_m
    block_n = default_block if block_n is None else block_n
    _check_block("block_m", block_m, tokens)
    _check_block("block_n", block_n, tokens)

    if qkv.device.type == "cpu" and not INTERPRETER_MODE:
        raise ValueError(
            "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is first "
            "imported, or use models.kernels.reference.window_attention_reference"
        )

    qkv = qkv.contiguous()
    table = table.contiguous()
    batch, channels3, height, width = qkv.shape
    out = torch.empty((batch, channels3 // 3, height, width), dtype=qkv.dtype, device=qkv.device)
    if batch == 0:
        return out

    problem = grid_limit_problem(batch, height, width, window, heads)
    if problem:
        raise ValueError(f"{problem}: split the input into tiles (runtimes.upscale tiles)")
    grid = launch_grid(batch, height, width, window, heads, block_m)
    n_win_cols = math.ceil(width / window)
    _window_attention_fwd[grid](
        qkv,
        table,
        out,
        height,
        width,
        max(2 * (height - 1), 1),
        max(2 * (width - 1), 1),
        n_win_cols,
        heads,
        HEAD_DIM**-0.5 * _LOG2E,
        _LOG2E,
        WINDOW=window,
        HEAD_DIM=HEAD_DIM,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_DTYPE=tl.float32 if INTERPRETER_MODE else _TL_DTYPES[qkv.dtype],
    )
    return out
