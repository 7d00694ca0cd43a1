"""The ESC block and its ConvAttn modules, shared by ESC, ESC-FP and ESC-Real.

Module names mirror upstream's state-dict keys (``blocks.{i}.pconvs.{j}.plk.dwc_proj.1``
and so on) so official checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import WindowAttention
from .layers import (
    ChannelLayerNorm,
    ConvFFN,
    dynamic_depthwise3x3,
    dynamic_depthwise3x3_conv,
    dynamic_depthwise3x3_grouped,
    one_hot_taps,
)

DYNAMIC_KERNEL = 3


def kernel_estimator(pdim: int, hidden: int) -> nn.Sequential:
    """Global average pool -> 1x1 -> GELU -> 1x1 producing a 3x3 kernel per channel.

    Indices 1 and 3 carry the weights, as in upstream's ``nn.Sequential``.
    """
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(pdim, hidden, 1),
        nn.GELU(),
        nn.Conv2d(hidden, pdim * DYNAMIC_KERNEL * DYNAMIC_KERNEL, 1),
    )


def _estimate(estimator: nn.Sequential, x1: torch.Tensor) -> torch.Tensor:
    """(B, pdim*9, 1, 1) estimator output -> (B, pdim, 3, 3): one kernel per image."""
    return estimator(x1).reshape(x1.shape[0], x1.shape[1], DYNAMIC_KERNEL, DYNAMIC_KERNEL)


class _DynamicKernelForm:
    """Mixin: which form of the dynamic 3x3 convolution a ConvAttn module runs.

    ``"shifts"`` (nine shifted multiply-adds, the default), ``"conv"`` (one fixed
    one-hot depthwise conv + multiply + sum: the same sum in 4 graph nodes, which
    exporters prefer; its one-hot weights are a non-persistent buffer, so they follow
    ``.to()``/``.half()`` and never enter the state dict) or ``"grouped"`` (one grouped
    convolution over ``B * C`` groups: the fast eager form, shifts when a graph is
    captured). Set through :meth:`models.base.ESCBase.set_dynamic_kernel_form`.
    """

    dynamic_form: str = "shifts"
    pdim: int

    def set_dynamic_form(self, form: str) -> None:
        self.dynamic_form = form
        if form == "conv" and getattr(self, "one_hot", None) is None:
            weight = next(self.parameters())
            self.register_buffer("one_hot", one_hot_taps(self.pdim, weight.dtype).to(weight.device),
                                 persistent=False)

    def large_kernel_conv(self, x: torch.Tensor, kernel: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """The static large-kernel convolution ('same' zero padding); a seam the Neural Engine
        form (``models.ane``) overrides to run it as smaller exact pieces."""
        return F.conv2d(x, kernel.to(x.dtype), padding=kernel.shape[-1] // 2, groups=groups)

    def dynamic_depthwise(self, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        if self.dynamic_form == "conv":
            return dynamic_depthwise3x3_conv(x, kernel, self.one_hot)
        if self.dynamic_form == "grouped":
            return dynamic_depthwise3x3_grouped(x, kernel)
        return dynamic_depthwise3x3(x, kernel)


class ConvAttention(_DynamicKernelForm, nn.Module):
    """ESC's ConvAttn on the first ``pdim`` channels: shared large kernel + dynamic 3x3.

    ``x1 -> conv(x1, LK) + depthwise(x1, DK(x1))``; the other channels pass through.
    Built with ``torch.cat`` rather than upstream's in-place slice write.
    """

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.dwc_proj = kernel_estimator(pdim, pdim // 2)

    def forward(self, x: torch.Tensor, large_kernel: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.split([self.pdim, x.shape[1] - self.pdim], dim=1)
        dk = _estimate(self.dwc_proj, x1)
        y1 = self.large_kernel_conv(x1, large_kernel)
        y1 = y1 + self.dynamic_depthwise(x1, dk)
        return torch.cat([y1, x2], dim=1)


class DecomposedConvAttention(_DynamicKernelForm, nn.Module):
    """ESC-FP's ConvAttn: 1x1 channel mix, then a 13x13 depthwise kernel per image.

    Upstream adds the dynamic 3x3 kernel, zero-padded to 13x13, to the shared spatial
    kernel and runs one grouped convolution over ``B * pdim`` groups. By linearity that
    is the static depthwise 13x13 convolution plus the dynamic 3x3 one (its centre), so
    the shared kernel stays a static weight and 160 of the 169 dynamic taps, all zero,
    are never computed.
    """

    def __init__(self, pdim: int) -> None:
        super().__init__()
        self.pdim = pdim
        self.proj = kernel_estimator(pdim, pdim // 4)

    def forward(self, x: torch.Tensor, lk_channel: torch.Tensor, lk_spatial: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.split([self.pdim, x.shape[1] - self.pdim], dim=1)
        dk = _estimate(self.proj, x1)
        mixed = F.conv2d(x1, lk_channel.to(x.dtype))
        y1 = self.large_kernel_conv(mixed, lk_spatial, groups=self.pdim)
        y1 = y1 + self.dynamic_depthwise(mixed, dk)
        return torch.cat([y1, x2], dim=1)


class ConvAttnWrapper(nn.Module):
    """ConvAttn followed by its 1x1 ``aggr`` over all channels."""

    def __init__(self, dim: int, plk: nn.Module) -> None:
        super().__init__()
        self.plk = plk
        self.aggr = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, *kernels: torch.Tensor) -> torch.Tensor:
        return self.aggr(self.plk(x, *kernels))


class Block(nn.Module):
    """One ESC block: ConvFFN, one window attention, then M (ConvFFN -> ConvAttn) pairs.

    ``x -> proj(ln_proj(x)) -> + attn(ln_attn(.)) -> M x [+ pconv_j(convffn_j(ln_j(.)))]
    -> conv_out(ln_out(.)) + x``. ``ln_j`` is an identity (no keys) in ESC and ESC-light.
    """

    def __init__(self, dim: int, pdim: int, conv_blocks: int, window: int, heads: int,
                 exp_ratio: float, proj_ratio: float, use_lns: bool, decomposed: bool,
                 flashbias_rank: int = 0) -> None:
        super().__init__()
        self.ln_proj = ChannelLayerNorm(dim)
        self.proj = ConvFFN(dim, proj_ratio)
        self.ln_attn = ChannelLayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, flashbias_rank)
        self.lns = nn.ModuleList(
            [ChannelLayerNorm(dim) if use_lns else nn.Identity() for _ in range(conv_blocks)])
        plk_cls = DecomposedConvAttention if decomposed else ConvAttention
        self.pconvs = nn.ModuleList([ConvAttnWrapper(dim, plk_cls(pdim)) for _ in range(conv_blocks)])
        self.convffns = nn.ModuleList([ConvFFN(dim, exp_ratio) for _ in range(conv_blocks)])
        self.ln_out = ChannelLayerNorm(dim)
        self.conv_out = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, *kernels: torch.Tensor) -> torch.Tensor:
        skip = x
        x = self.proj(self.ln_proj(x))
        x = x + self.attn(self.ln_attn(x))
        for ln, pconv, ffn in zip(self.lns, self.pconvs, self.convffns):
            x = x + pconv(ffn(ln(x)), *kernels)
        return self.conv_out(self.ln_out(x)) + skip

    def norm_conv_pairs(self) -> list[tuple[ChannelLayerNorm, nn.Conv2d]]:
        """Every (LayerNorm, following 1x1 conv) pair whose affine folds exactly."""
        pairs = [(self.ln_proj, self.proj.proj), (self.ln_attn, self.attn.to_qkv)]
        pairs += [(ln, ffn.proj) for ln, ffn in zip(self.lns, self.convffns)
                  if isinstance(ln, ChannelLayerNorm)]
        return pairs
