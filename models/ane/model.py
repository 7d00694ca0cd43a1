"""The whole network in its ANE form: blocks switched in place, tail rewritten in rank 4."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelOptionError
from .attention import AneAttention, AneBiasConstants
from .dynamic import use_rank4_dynamic_kernels

__all__ = ["AneModel", "ane_form", "ANE_ARCHS"]

#: Architectures whose tail has a rank-4 ANE form.
ANE_ARCHS = ("esc", "esc_fp")
#: The dense bias constants of all blocks together, in fp16, may not exceed this: ESC holds
#: 40 MiB (5 blocks x 4 heads x 1024^2), ESC-XL's 48x48 windows would need 972 MiB.
ANE_BIAS_LIMIT_BYTES = 256 * 2**20


class AneModel(nn.Module):
    """``model`` with its output tail in rank 4 (``pixel_shuffle`` + an upsampled image skip).

    ESC adds the input repeated s*s times before a rank-5 pixel shuffle; since a pixel
    shuffle only moves values, that equals ``pixel_shuffle(to_img(feat))`` plus the input
    upsampled by nearest neighbour. ESC-FP's bicubic skip becomes replicate padding, its
    fixed phase convolution and ``pixel_shuffle``. Descriptor, scale and config are the
    wrapped model's.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        arch = getattr(getattr(model, "config", None), "arch", None)
        if arch not in ANE_ARCHS:
            raise ModelOptionError(f"the ANE form exists for {', '.join(ANE_ARCHS)} models, not {arch!r} "
                                   f"({type(model).__name__}); export it without form='ane'")
        self.model = model
        self.scale = model.scale
        self.config = model.config

    @property
    def descriptor(self):
        return self.model.descriptor

    def attention_modules(self) -> list[nn.Module]:
        return self.model.attention_modules()

    def image_skip(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        if self.config.arch == "esc":
            return F.interpolate(x, scale_factor=s, mode="nearest")
        up = self.model.upsample
        phases = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), up.weight.to(x.dtype), groups=up.channels)
        return F.pixel_shuffle(phases, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.model.to_img(self.model.features(x)), self.scale) + self.image_skip(x)


@torch.no_grad()
def ane_form(model: nn.Module, query_chunk: int | None = None) -> AneModel:
    """Switch ``model`` (an ESC / ESC-FP network, changed in place) to its ANE form.

    The model is deployed first (folds are exact); every attention block gets
    :class:`AneAttention` and its bias as constants (``query_chunk`` queries per constant
    and per score tensor; None: the whole window), every ConvAttn the rank-4 dynamic 3x3.
    Returns the :class:`AneModel` to call or export. Deep-copy first to keep the original.
    """
    if not hasattr(model, "attention_modules") or not hasattr(model, "deploy"):
        raise ModelOptionError(f"{type(model).__name__} is not an ESC model: no ANE form")
    wrapped = AneModel(model)
    bias_bytes = sum(2 * attn.heads * attn.window ** 4 for attn in model.attention_modules())
    if bias_bytes > ANE_BIAS_LIMIT_BYTES:
        raise ModelOptionError(
            f"the ANE form stores every block's dense attention bias: {bias_bytes / 2**20:.0f} MiB in fp16 for this "
            f"model (limit {ANE_BIAS_LIMIT_BYTES // 2**20} MiB); export it with the compat form instead")
    model.deploy(precompute_bias=False)
    for attn in model.attention_modules():
        tokens = attn.window * attn.window
        attn.ane_bias = AneBiasConstants(attn.relative_position_bias, attn.window, query_chunk or tokens)
        attn.backend = AneAttention(query_chunk)
    use_rank4_dynamic_kernels(model)
    return wrapped.eval()
