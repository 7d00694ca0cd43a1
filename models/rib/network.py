"""What ESC-RIB and SST share: back-end selection, deploy, descriptor."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..base import ESCBase, ModelDescriptor, TilingBehaviour
from .attention import RIBAttention
from .backends import RIBBackend, make_rib_backend
from .config import RIBConfig


@dataclass(frozen=True)
class RIBDescriptor(ModelDescriptor):
    """:class:`ModelDescriptor` plus the window of every attention layer.

    ``window_size`` is the largest window and ``input_multiple`` their least common
    multiple (the largest, for every published config).
    """

    window_sizes: tuple[int, ...] = ()


class RIBNetwork(nn.Module):
    """Base of the RIB networks.

    ``deploy``, ``num_params`` and the dynamic-kernel form are ESC's own methods (shared,
    not rewritten): they only rely on ``attention_modules``, ``blocks`` with
    ``norm_conv_pairs``, ``fold_large_kernels`` and the attention modules'
    ``precompute_bias`` / ``drop_bias_cache``, which the RIB networks provide. Deploy
    therefore folds the large kernel (ESC-RIB), every exact LayerNorm affine, and the
    positional factors into per-layer constants.
    """

    deploy = ESCBase.deploy
    num_params = ESCBase.num_params
    set_dynamic_kernel_form = ESCBase.set_dynamic_kernel_form
    dynamic_kernel_form = ESCBase.dynamic_kernel_form
    attention = ESCBase.attention

    def __init__(self, config: RIBConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.deployed = False
        self.trained_params = 0

    def fold_large_kernels(self) -> None:
        """Deploy-time fold of a large kernel; nothing to fold unless overridden."""

    def attention_modules(self) -> list[RIBAttention]:
        return [m for m in self.modules() if isinstance(m, RIBAttention)]

    def set_attention(self, backend: str | RIBBackend, **options) -> RIBNetwork:
        """Use ``backend`` (``sdpa``, ``naive``, ``concat``) in every attention layer."""
        for attn in self.attention_modules():
            attn.backend = make_rib_backend(backend, **options)
        return self

    def tiling_behaviour(self) -> TilingBehaviour:
        raise NotImplementedError

    @property
    def descriptor(self) -> RIBDescriptor:
        from ..config import closest_variant

        name, exact = closest_variant(self.config)
        return RIBDescriptor(
            variant=name, exact_variant=exact, arch=self.config.arch, scale=self.scale,
            window_size=self.config.window_size, input_multiple=self.config.input_multiple, min_size=1,
            supports_half=True, tiling=self.tiling_behaviour(), params=self.num_params(),
            attention=self.attention, deployed=self.deployed, bias="rib factors",
            window_sizes=self.config.layer_windows)
