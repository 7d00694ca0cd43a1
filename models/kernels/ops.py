"""``esc::window_attention``: the fused window attention as a PyTorch custom op.

Wrapping the kernel in ``torch.library.custom_op`` makes it one opaque node
for ``torch.export`` / ``torch.compile`` (a fake kernel gives them the output
metadata), so exported graphs carry a single ``esc.window_attention`` call that
each runtime maps to its own implementation, instead of a traced pad /
partition / matmul / softmax / reverse subgraph.

Dispatch of the real implementation:

* CUDA tensors -> the Triton kernel;
* CPU tensors -> the Triton kernel under Triton's interpreter when
  ``TRITON_INTERPRET=1`` (tests on GPU-less machines), else the torch
  reference (also what the ONNX Runtime custom op calls);
* anything else -> the torch reference.

Triton is imported lazily so CPU-only deployments never need it. The op is
inference-only: no autograd formula is registered.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .reference import HEAD_DIM, check_window_attention_args, window_attention_reference


def _use_triton(qkv: Tensor) -> bool:
    """Whether the real implementation should launch the Triton kernel for ``qkv``."""
    if qkv.device.type == "cuda":
        return True
    return qkv.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("esc::window_attention", mutates_args=())
def window_attention(qkv: Tensor, table: Tensor, window: int, heads: int) -> Tensor:
    """Reflect-padded window attention; see :func:`window_attention_reference`."""
    if _use_triton(qkv):
        from .window_attention_triton import window_attention_triton

        return window_attention_triton(qkv, table, window, heads)
    return window_attention_reference(qkv, table, window, heads)


@window_attention.register_fake
def _window_attention_fake(qkv: Tensor, table: Tensor, window: int, heads: int) -> Tensor:
    """Output metadata only: ``(B, heads*16, H, W)`` in ``qkv.dtype``, contiguous.

    Validates like the real kernels so a bad call fails at export / compile
    time rather than on the target runtime.
    """
    check_window_attention_args(qkv, table, window, heads)
    batch, _, height, width = qkv.shape
    return qkv.new_empty((batch, heads * HEAD_DIM, height, width))


def fused_window_attention(qkv: Tensor, table: Tensor, window: int, heads: int) -> Tensor:
    """Call ``torch.ops.esc.window_attention``; the entry point for model code.

    Args:
        qkv: ``(B, 3*heads*16, H, W)`` map, channel ``s*C + h*16 + d`` (s: q, k, v).
        table: ``(heads, (2*window-1)**2)`` relative-position bias table.
        window: window size (a multiple of 16 for the Triton kernel).
        heads: number of attention heads (head dim is fixed at 16).

    Returns:
        ``(B, heads*16, H, W)`` attention output in ``qkv.dtype``.
    """
    return torch.ops.esc.window_attention(qkv, table, window, heads)
