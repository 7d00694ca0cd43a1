"""Building blocks shared by every ESC variant, written for exporters.

Each layer here computes what the official code computes, but in a form that
ONNX, Core ML and TensorRT accept: no in-place writes into slices, no tensor of rank
above 5, batch > 1 with per-image dynamic kernels, and any input size from 1x1 up.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW map (upstream's channels-first LN).

    Written as explicit mean/variance over dim 1 instead of permute + ``F.layer_norm``:
    ONNX's ``LayerNormalization`` normalises trailing axes only, so the permute form
    exports as two transposes around every norm. Statistics are computed in fp32 so
    the fp16 path does not lose the 1e-6 epsilon. After :meth:`drop_affine` (the
    deploy-time fold into the next 1x1 convolution) the module only normalises.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight: nn.Parameter | None = nn.Parameter(torch.ones(dim))
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        centred = xf - xf.mean(dim=1, keepdim=True)
        var = (centred * centred).mean(dim=1, keepdim=True)
        y = centred * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)

    @torch.no_grad()
    def drop_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove the affine parameters and return them (gamma, beta) for folding."""
        if self.weight is None:
            raise RuntimeError("this LayerNorm's affine was already folded")
        gamma, beta = self.weight.detach().clone(), self.bias.detach().clone()
        self.weight = None
        self.bias = None
        return gamma, beta


class ConvFFN(nn.Module):
    """1x1 expand -> GELU -> (depthwise 3x3 -> GELU) + identity -> 1x1 project."""

    def __init__(self, dim: int, exp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * exp_ratio)
        self.proj = nn.Conv2d(dim, hidden, 1)
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.aggr = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.gelu(self.proj(x))
        return self.aggr(F.gelu(self.dwc(g)) + g)


def reflect_indices(size: int | torch.SymInt, before: int | torch.SymInt, after: int | torch.SymInt,
                    device: torch.device | None = None) -> torch.Tensor:
    """Source indices of a reflect-padded axis, defined for any pad.

    Position ``p`` in ``[-before, size + after)`` reads ``reflect(p)``: the iterated
    reflection of numpy's ``np.pad(mode="reflect")``. Where ``pad < size`` it is exactly
    ``torch``'s reflect padding (so we match upstream bit for bit); where upstream's
    reflect padding would fail (inputs smaller than about half a window) it keeps
    bouncing off the borders instead, and a size-1 axis simply repeats its only pixel.
    This is the documented fallback for tiny inputs.
    """
    pos = torch.arange(size + before + after, device=device) - before
    # A 0-d tensor rather than a Python (symbolic) int: exporters translate a tensor
    # remainder (ONNX ``Mod``) but not one by a symbolic scalar.
    period = torch.zeros((), dtype=pos.dtype, device=device) + torch.sym_max(2 * (size - 1), 1)
    m = torch.remainder(pos, period)
    return torch.where(m < size, m, period - m)


def reflect_pad(x: torch.Tensor, top: int | torch.SymInt, bottom: int | torch.SymInt,
                left: int | torch.SymInt, right: int | torch.SymInt) -> torch.Tensor:
    """Reflect-pad the last two axes with :func:`reflect_indices` (an index gather).

    A gather exports the same way for every input size (ONNX ``Gather``, Core ML
    ``gather``), whereas ``F.pad(mode="reflect")`` becomes a ``Pad`` that runtimes
    reject when the pad reaches the size.
    """
    if all(isinstance(p, int) and p == 0 for p in (top, bottom, left, right)):
        return x  # nothing to pad (a static size already a multiple): no gather, no copy
    h, w = x.shape[-2], x.shape[-1]
    rows = reflect_indices(h, top, bottom, x.device)
    cols = reflect_indices(w, left, right, x.device)
    # Advanced indexing on the last axis is ~3x faster on CPU than a second index_select
    # (measured on a 192x128x128 map); both export as one Gather.
    return x.index_select(-2, rows)[..., cols]


class ReflectPadConv2d(nn.Conv2d):
    """A ``Conv2d(padding_mode="reflect")`` whose padding works for any input size."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pad = self.padding
        self.padding = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self._pad
        return super().forward(reflect_pad(x, ph, ph, pw, pw))


def dynamic_depthwise3x3(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 3x3 cross-correlation with a different kernel per image, zero padding 1.

    ``x`` is (B, C, H, W), ``kernel`` (B, C, 3, 3). Upstream folds the batch into the
    channel axis and runs one grouped convolution with ``groups = B * C``; that group
    count is data dependent, which breaks dynamic-batch export, and its eval path even
    assumes B == 1. Nine shifted multiply-adds compute the same sum for any batch and
    export as plain Slice/Mul/Add.
    """
    h, w = x.shape[-2], x.shape[-1]
    padded = F.pad(x, (1, 1, 1, 1))
    out = padded[:, :, 0:h, 0:w] * kernel[:, :, 0, 0, None, None]
    for i in range(3):
        for j in range(3):
            if i == 0 and j == 0:
                continue
            out = out + padded[:, :, i:i + h, j:j + w] * kernel[:, :, i, j, None, None]
    return out


def one_hot_taps(channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(channels * 9, 1, 3, 3) depthwise weights whose nine outputs per channel are its shifts."""
    eye = torch.eye(9, dtype=torch.float32).reshape(9, 1, 3, 3)
    return eye.repeat(channels, 1, 1, 1).to(dtype)


def dynamic_depthwise3x3_conv(x: torch.Tensor, kernel: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Same sum as :func:`dynamic_depthwise3x3`, as one fixed depthwise Conv + Mul + ReduceSum.

    Why: the nine shifted slices trace to ~60 graph nodes per call (15 to 50 calls per
    model); exporters want 4. The one-hot depthwise convolution copies the nine zero-padded
    shifts exactly (one tap is 1, the others 0), the per-image kernel multiplies them and
    one sum over the taps adds them up. Rank 5 at most. ``taps`` is :func:`one_hot_taps`
    held by the caller as a buffer, so a trace sees one real constant.
    """
    b, c, h, w = x.shape
    shifts = F.conv2d(x, taps.to(x.dtype), padding=1, groups=c)
    return (shifts.reshape(b, c, 9, h, w) * kernel.reshape(b, c, 9, 1, 1)).sum(dim=2)


def capturing_graph() -> bool:
    """True while an exporter or compiler traces the model (torch.export, dynamo, jit, ONNX).

    Eager-only fast paths (a data-dependent group count, an SDPA kernel choice) must not
    leak into captured graphs, whose forms are chosen for exporters.
    """
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def dynamic_depthwise3x3_grouped(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Same sum as :func:`dynamic_depthwise3x3`, as one grouped convolution (eager fast path).

    The batch is folded into the channel axis (``groups = B * C``, upstream's eval form):
    one oneDNN depthwise kernel instead of 17 full-map multiply/adds. Its group count
    depends on the batch, so graph captures get the shifted form instead.
    """
    if capturing_graph():
        return dynamic_depthwise3x3(x, kernel)
    b, c, h, w = x.shape
    out = F.conv2d(x.reshape(1, b * c, h, w), kernel.reshape(b * c, 1, 3, 3).to(x.dtype), padding=1, groups=b * c)
    return out.reshape(b, c, h, w)


#: Forms of the per-image dynamic 3x3 convolution (``ESCBase.set_dynamic_kernel_form``).
DYNAMIC_KERNEL_FORMS = ("shifts", "conv", "grouped")


def geometric_ensemble(kernel: torch.Tensor) -> torch.Tensor:
    """Mean of the 8 dihedral transforms of a (out, in, k, k) kernel's spatial axes.

    Upstream never uses its stored large kernel directly: each forward averages the
    identity, the three flips, the clockwise quarter turn and that turn's three flips.
    Folding this once at load time is the first deploy-time reparameterisation.
    """
    turned = torch.rot90(kernel, -1, dims=(2, 3))
    views = []
    for k in (kernel, turned):
        views += [k, k.flip(3), k.flip(2), k.flip((2, 3))]
    return torch.stack(views).mean(dim=0)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``F.pixel_shuffle`` through rank-5 tensors only (Core ML allows rank <= 5).

    (B, C*s*s, H, W) -> (B*C, s, s, H, W) -> (B*C, H, s, W, s) -> (B, C, H*s, W*s).
    """
    b, c, h, w = x.shape
    oc = c // (scale * scale)
    x = x.reshape(b * oc, scale, scale, h, w).permute(0, 3, 1, 4, 2)
    return x.reshape(b, oc, h * scale, w * scale)


def repeat_channels(x: torch.Tensor, repeats: int) -> torch.Tensor:
    """``torch.repeat_interleave(x, repeats, dim=1)`` as expand + reshape (rank 5)."""
    b, c, h, w = x.shape
    return x[:, :, None].expand(b, c, repeats, h, w).reshape(b, c * repeats, h, w)


def _cubic_weight(t: float, a: float) -> float:
    """Keys' cubic convolution kernel at distance ``t`` with parameter ``a``."""
    t = abs(t)
    if t <= 1:
        return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
        return (((t - 5) * t + 8) * t - 4) * a
    return 0.0


def _bicubic_phase_taps(scale: int, a: float = -0.75) -> torch.Tensor:
    """(scale, 5) taps over source offsets -2..2 for each output phase.

    PyTorch's ``interpolate(mode="bicubic", align_corners=False)`` maps output ``o`` to
    source ``(o + 0.5) / s - 0.5``; for an integer scale each phase ``o % s`` always uses
    the same four of the five neighbours ``q-2 .. q+2`` with fixed weights.
    """
    taps = torch.zeros(scale, 5, dtype=torch.float64)
    for phase in range(scale):
        src = (phase + 0.5) / scale - 0.5
        base = math.floor(src)
        frac = src - base
        for k in range(-1, 3):
            taps[phase, base + k + 2] = _cubic_weight(k - frac, a)
    return taps


class BicubicUpsample(nn.Module):
    """Exact ``F.interpolate(x, scale_factor=s, mode="bicubic")`` for RGB and integer ``s``.

    Computed as replicate padding (PyTorch clamps source indices at the border), one
    fixed 5x5 depthwise convolution per output phase, and a pixel shuffle. Unlike a
    ``Resize`` node this runs identically in every runtime, whose cubic modes differ in
    their coefficient and border rules.
    """

    def __init__(self, scale: int, channels: int = 3) -> None:
        super().__init__()
        self.scale = scale
        self.channels = channels
        taps = _bicubic_phase_taps(scale)
        phase_kernels = torch.einsum("pi,qj->pqij", taps, taps).reshape(scale * scale, 1, 5, 5)
        weight = phase_kernels.repeat(channels, 1, 1, 1).float()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
        phases = F.conv2d(padded, self.weight.to(x.dtype), groups=self.channels)
        return pixel_shuffle(phases, self.scale)
