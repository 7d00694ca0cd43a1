"""What every ESC network shares: the body, back-end selection, deploy and descriptor."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionBackend, WindowAttention, make_backend
from .blocks import Block
from .config import ESCConfig, closest_variant


@dataclass(frozen=True)
class TilingBehaviour:
    """What tiling does to a model's output, so a tiler can plan honestly.

    ``exact``: a tiled upscale equals the untiled one given enough context. ESC's is
    not: each dynamic-kernel estimator average-pools its whole input, so a tile sees its
    own mean rather than the image's. ``align``: tile origins on this input grid keep the
    attention windows where an untiled run puts them. ``context``: input pixels of
    overlap after which more context stops helping (the receptive field's reach).
    Truthy when tiling is supported at all.
    """

    supported: bool
    exact: bool
    align: int
    context: int
    note: str

    def __bool__(self) -> bool:
        return self.supported


@dataclass(frozen=True)
class ModelDescriptor:
    """What a caller needs to know to feed the model (in the spirit of spandrel's).

    ``input_multiple``: inputs whose sides are multiples of it need no window padding
    (any size works; other sizes pay for reflect padding). ``supports_half``: fp16
    inference is numerically safe (LayerNorm statistics and softmax run in fp32).
    ``tiling``: a :class:`TilingBehaviour` (what tiling does to this model's output).
    """

    variant: str
    exact_variant: bool
    arch: str
    scale: int
    window_size: int
    input_multiple: int
    min_size: int
    supports_half: bool
    tiling: TilingBehaviour
    params: int
    attention: str
    deployed: bool
    #: What the weights hold for the attention bias: ``"table"`` (relative-position table),
    #: ``"flashbias rank R"`` (upstream's FlashBias factors) or ``"rib factors"`` (ESC-RIB, SST).
    bias: str = "table"


class ESCBase(nn.Module):
    """Shallow conv -> N blocks -> ``last`` + skip; subclasses add kernels and the tail."""

    def __init__(self, config: ESCConfig, decomposed: bool) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.proj = nn.Conv2d(3, config.dim, 3, padding=1)
        self.blocks = nn.ModuleList([
            Block(config.dim, config.pdim, config.conv_blocks, config.window_size, config.num_heads,
                  config.exp_ratio, config.proj_ratio, config.use_lns, decomposed, config.flashbias_rank)
            for _ in range(config.n_blocks)
        ])
        self.last = nn.Conv2d(config.dim, config.dim, 3, padding=1)
        self.deployed = False
        self.trained_params = 0

    # -- subclass hooks -----------------------------------------------------------------
    def large_kernels(self) -> tuple[torch.Tensor, ...]:
        """The kernels every ConvAttn shares, as used at run time."""
        raise NotImplementedError

    def fold_large_kernels(self) -> None:
        """Deploy-time fold of the large kernel(s); a no-op where nothing folds."""

    # -- shared ---------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Deep features ``last(blocks(proj(x))) + proj(x)`` (before any tail)."""
        feat = self.proj(x)
        skip = feat
        kernels = self.large_kernels()
        for block in self.blocks:
            feat = block(feat, *kernels)
        return self.last(self.pre_last(feat)) + skip

    def pre_last(self, feat: torch.Tensor) -> torch.Tensor:
        return feat

    def attention_modules(self) -> list[WindowAttention]:
        return [block.attn for block in self.blocks]

    def set_attention(self, backend: str | AttentionBackend, **options) -> "ESCBase":
        """Use ``backend`` (``naive``, ``sdpa``, ``flex``, ``flashbias``, ``fused``) in every block.

        Each block gets its own back-end instance so per-block state stays separate.
        """
        for attn in self.attention_modules():
            attn.backend = make_backend(backend, **options) if isinstance(backend, str) else backend
        return self

    def set_dynamic_kernel_form(self, form: str) -> "ESCBase":
        """Compute every ConvAttn's dynamic 3x3 as ``"shifts"`` (default) or ``"conv"``.

        Both forms give the same sums (within float rounding); exporters pick ``"conv"``
        on their own copy for a smaller graph. Unknown forms are refused by name.
        """
        from .errors import ModelOptionError
        from .layers import DYNAMIC_KERNEL_FORMS

        if form not in DYNAMIC_KERNEL_FORMS:
            raise ModelOptionError(f"unknown dynamic-kernel form {form!r}; choose one of {', '.join(DYNAMIC_KERNEL_FORMS)}")
        for module in self.modules():
            if hasattr(module, "set_dynamic_form"):
                module.set_dynamic_form(form)
        return self

    def ane_form(self, **options) -> nn.Module:
        """This model, changed in place, in its Apple Neural Engine form (:func:`models.ane.ane_form`,
        which takes ``options``): rank-4 tensors, the attention bias as constants, no gathers; the same outputs."""
        from .ane import ane_form

        return ane_form(self, **options)

    @property
    def dynamic_kernel_form(self) -> str:
        forms = {m.dynamic_form for m in self.modules() if hasattr(m, "dynamic_form")}
        return forms.pop() if len(forms) == 1 else "mixed"

    def num_params(self) -> int:
        """Parameters as trained (before deploy folds remove the LayerNorm affines)."""
        return self.trained_params if self.deployed else sum(p.numel() for p in self.parameters())

    @property
    def attention(self) -> str:
        return self.attention_modules()[0].backend.name

    @torch.no_grad()
    def deploy(self, precompute_bias: bool = True) -> "ESCBase":
        """Apply every exact deploy-time reparameterisation, once; returns ``self`` in eval mode.

        1. the large kernel's geometric ensemble is folded into one kernel;
        2. each LayerNorm affine is folded into the 1x1 convolution after it;
        3. the dense attention bias is precomputed per block (below a size limit).
        Each step is a separate function in :mod:`models.deploy`, tested on its own.
        """
        from . import deploy as folds

        if not self.deployed:
            self.trained_params = self.num_params()
            folds.fold_large_kernels(self)
            folds.fold_layernorm_affine(self)
            self.deployed = True
        if precompute_bias:
            folds.precompute_attention_bias(self)
        else:
            for attn in self.attention_modules():
                attn.drop_bias_cache()
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    #: Input pixels of tile context after which tiled output stops improving (measured on
    #: ESC x4: max abs 9e-2 at 16 px, 3.1e-4 at 64 px, 3.5e-6 at 96 px with aligned tiles).
    TILE_CONTEXT = 96

    def tiling_behaviour(self) -> TilingBehaviour:
        window = self.config.window_size
        return TilingBehaviour(
            supported=True, exact=False, align=window, context=self.TILE_CONTEXT,
            note=(f"tiles differ slightly from an untiled run: every dynamic-kernel estimator "
                  f"average-pools its whole input, so a tile sees its own mean; start tiles on the "
                  f"{window}-pixel window grid with >= {self.TILE_CONTEXT} px of context to stay closest"))

    @property
    def descriptor(self) -> ModelDescriptor:
        name, exact = closest_variant(self.config)
        return ModelDescriptor(
            variant=name, exact_variant=exact, arch=self.config.arch, scale=self.scale,
            window_size=self.config.window_size, input_multiple=self.config.window_size, min_size=1,
            supports_half=True, tiling=self.tiling_behaviour(), params=self.num_params(),
            attention=self.attention, deployed=self.deployed, bias=self.attention_modules()[0].bias_form)
