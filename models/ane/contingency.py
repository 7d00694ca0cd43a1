"""Two rewrites a Mac user can turn on when the compute plan shows these ops off the Neural Engine.

Neither is on by default: on Linux nothing says the Neural Engine refuses ESC's 13x13
convolutions or its global means (the public record caps kernels at 13; reductions are
listed as supported), and both rewrites cost extra ops. They exist for the case a Mac run
of ``benchmarks/mac_evidence.py`` (MLComputePlan) shows otherwise:

- :func:`conv_in_pieces`: a k x k convolution as the sum of ceil(k/p)^2 convolutions with
  p x p pieces of its kernel (13x13 -> four 7x7), on one zero-padded copy of the input.
  Exact in real arithmetic: every tap of the kernel is in exactly one piece, at the same
  offset; only the order of the sums changes.
- :class:`ConstantWeightMean`: the global average pool of the dynamic-kernel estimators
  as a chain of strided depthwise convolutions with constant weights (every kernel <= 7),
  zero padding where a side has a prime factor above 7 and a constant correction for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConstantWeightMean", "conv_in_pieces", "mean_stages"]

#: The largest kernel side either rewrite uses (the lint warns above 7).
PIECE = 7


def conv_in_pieces(x: torch.Tensor, weight: torch.Tensor, piece: int = PIECE, groups: int = 1) -> torch.Tensor:
    """``F.conv2d(x, weight, padding=k // 2, groups=groups)`` for an odd square kernel, as piece x piece convolutions.

    The input is zero-padded once by ``k // 2`` on the top/left and by enough on the
    bottom/right that every piece sees a full window; piece (i, j) holds the kernel taps
    ``[i p, i p + p) x [j p, j p + p)`` (zero-filled past the kernel's edge) and reads the
    padded input from row ``i p`` and column ``j p``.
    """
    k = weight.shape[-1]
    if weight.shape[-2] != k or k % 2 == 0:
        raise ValueError(f"conv_in_pieces takes odd square kernels, got {tuple(weight.shape[-2:])}")
    if k <= piece:
        return F.conv2d(x, weight.to(x.dtype), padding=k // 2, groups=groups)
    n = math.ceil(k / piece)
    full = n * piece
    w = F.pad(weight.to(x.dtype), (0, full - k, 0, full - k))
    h, wd = x.shape[-2], x.shape[-1]
    pad = k // 2
    xp = F.pad(x, (pad, pad + full - k, pad, pad + full - k))
    out = None
    for i in range(n):
        for j in range(n):
            part = w[..., i * piece:(i + 1) * piece, j * piece:(j + 1) * piece]
            window = xp[..., i * piece:i * piece + h + piece - 1, j * piece:j * piece + wd + piece - 1]
            term = F.conv2d(window, part, groups=groups)
            out = term if out is None else out + term
    return out


def _side_factors(n: int) -> tuple[list[int], int]:
    """Factors <= :data:`PIECE` whose product is the smallest m >= n that has such a factoring, and m."""
    m = n
    while True:
        rest, factors = m, []
        for f in range(PIECE, 1, -1):
            while rest % f == 0:
                factors.append(f)
                rest //= f
        if rest == 1:
            return factors or [1], m
        m += 1


def mean_stages(height: int, width: int) -> tuple[list[tuple[int, int]], int, int]:
    """The (kh, kw) strided stages that average a ``height x width`` map to 1x1, and the padded sides."""
    fh, ph = _side_factors(height)
    fw, pw = _side_factors(width)
    count = max(len(fh), len(fw))
    fh += [1] * (count - len(fh))
    fw += [1] * (count - len(fw))
    return list(zip(fh, fw)), ph, pw


class ConstantWeightMean(nn.Module):
    """``x.mean((2, 3), keepdim=True)`` as strided depthwise convolutions with constant weights.

    Each stage averages kh x kw blocks (weights 1/(kh kw)), so values stay in range in
    fp16; a side zero-padded from n to m is corrected by the constant m / n at the end.
    Drop-in for ``nn.AdaptiveAvgPool2d(1)`` (no parameters, so state dicts are unchanged).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[1], int(x.shape[-2]), int(x.shape[-1])
        stages, ph, pw = mean_stages(h, w)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h))
        for kh, kw in stages:
            if kh == 1 and kw == 1:
                continue
            weight = torch.full((c, 1, kh, kw), 1.0 / (kh * kw), dtype=x.dtype, device=x.device)
            x = F.conv2d(x, weight, stride=(kh, kw), groups=c)
        if (ph, pw) != (h, w):
            x = x * ((ph * pw) / (h * w))
        return x
