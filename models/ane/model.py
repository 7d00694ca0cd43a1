"""The whole network in its ANE form: blocks switched in place, the tail rewritten in rank 4."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelOptionError
from .attention import use_ane_attention
from .budget import DEFAULT_BUDGET_BYTES, check_budget
from .dynamic import use_rank4_dynamic_kernels
from .ffn import use_chunked_ffns

__all__ = ["AneModel", "ane_form", "ANE_ARCHS", "skip_weight"]

#: Architectures whose tail has a rank-4 ANE form.
ANE_ARCHS = ("esc", "esc_fp")
#: The dense bias constants of all blocks together, in fp16, may not exceed this: ESC holds
#: 40 MiB (5 blocks x 4 heads x 1024^2), ESC-XL's 48x48 windows would need 972 MiB.
ANE_BIAS_LIMIT_BYTES = 256 * 2**20


def skip_weight(scale: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(3 s^2, 3, 1, 1) one-hot weights: output channel ``c s^2 + k`` copies input channel ``c``.

    That is ESC's ``repeat_channels(x, s^2)`` (the image skip added before the pixel
    shuffle) as one constant 1x1 convolution: each output is 1 * x + 0 * the others, which
    is x exactly in fp32 and fp16.
    """
    repeats = scale * scale
    weight = torch.zeros(3 * repeats, 3, 1, 1, dtype=dtype)
    for channel in range(3):
        weight[channel * repeats:(channel + 1) * repeats, channel] = 1.0
    return weight


class AneModel(nn.Module):
    """``model`` with its output tail in rank 4: one ``pixel_shuffle``, no upsampling.

    ESC adds the input repeated s*s times along the channels before its pixel shuffle;
    here the repeat is a constant one-hot 1x1 convolution (:func:`skip_weight`), so the
    tail is ``pixel_shuffle(to_img(feat) + conv(x, one_hot), s)``: the same values, and
    no x4 nearest upsampling (the Neural Engine's upsampling is known at x2 only). ESC-FP's
    bicubic skip becomes replicate padding and its fixed phase convolution, added before
    the same pixel shuffle. Descriptor, scale and config are the wrapped model's.
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
        weight = next(model.parameters())
        self.register_buffer("skip_one_hot", skip_weight(self.scale, weight.dtype).to(weight.device), persistent=False)

    @property
    def descriptor(self):
        return self.model.descriptor

    def attention_modules(self) -> list[nn.Module]:
        return self.model.attention_modules()

    def image_skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip in the pixel shuffle's channel layout (3 s^2 channels, ``c s^2 + phase``)."""
        if self.config.arch == "esc":
            return F.conv2d(x, self.skip_one_hot.to(x.dtype))
        up = self.model.upsample
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), up.weight.to(x.dtype), groups=up.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One pixel shuffle for both terms: a shuffle only moves values, so shuffling the sum
        # adds the same pairs as adding the two shuffles.
        return F.pixel_shuffle(self.model.to_img(self.model.features(x)) + self.image_skip(x), self.scale)


@torch.no_grad()
def ane_form(model: nn.Module, budget: int = DEFAULT_BUDGET_BYTES, large_kernel_pieces: bool = False,
             mean_as_conv: bool = False) -> AneModel:
    """Switch ``model`` (an ESC / ESC-FP network, changed in place) to its ANE form.

    The model is deployed first (folds are exact); every attention block gets the
    Neural Engine layout (:mod:`.attention`) with its bias as constants, every ConvAttn
    the rank-4 dynamic 3x3 (:mod:`.dynamic`), every ConvFFN budget-sized channel groups
    (:mod:`.ffn`). ``budget``: bytes of fp16 one intermediate may take (default 8 MiB);
    attention scores, FFN hidden maps and the dynamic 3x3's shifts are chunked to it.
    ``large_kernel_pieces`` / ``mean_as_conv``: the contingencies of :mod:`.contingency`
    (off by default). Returns the :class:`AneModel` to call or export. Deep-copy first to
    keep the original.
    """
    if not hasattr(model, "attention_modules") or not hasattr(model, "deploy"):
        raise ModelOptionError(f"{type(model).__name__} is not an ESC model: no ANE form")
    check_budget(budget)
    wrapped = AneModel(model)
    bias_bytes = sum(2 * attn.heads * attn.window ** 4 for attn in model.attention_modules())
    if bias_bytes > ANE_BIAS_LIMIT_BYTES:
        raise ModelOptionError(
            f"the ANE form stores every block's dense attention bias: {bias_bytes / 2**20:.0f} MiB in fp16 for this "
            f"model (limit {ANE_BIAS_LIMIT_BYTES // 2**20} MiB); export it with the compat form instead")
    model.deploy(precompute_bias=False)
    use_ane_attention(model.attention_modules(), budget)
    use_rank4_dynamic_kernels(model, budget, large_kernel_pieces, mean_as_conv)
    use_chunked_ffns(model, budget)
    return wrapped.eval()
