"""Hyper-parameters of the RIB family: ESC-RIB and the SST networks.

Unlike ESC, a RIB checkpoint does not determine its network: the positional factors are
produced by a small MLP from window coordinates, so the same weights run at any window
size. The window sizes therefore live here (from the published configs), never in the
weights; :meth:`RIBConfig.structure` is the part the weights do determine.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

RIBArch = Literal["esc_rib", "sst"]


@dataclass(frozen=True)
class RIBConfig:
    """What a RIB network looks like; field names follow upstream's constructors.

    ``window_sizes``, ``num_heads`` and ``ranks`` are per layer of a block (ESC-RIB has one
    attention layer per block). ``pdim``, ``kernel_size``, ``conv_blocks`` and
    ``proj_ratio`` shape ESC-RIB's convolutional part only; ``intermediate_dim`` is the
    width of SST's pixel-shuffle upsampler only.
    """

    arch: RIBArch
    scale: int
    dim: int
    window_sizes: tuple[int, ...]
    num_heads: tuple[int, ...]
    ranks: tuple[int, ...]
    n_blocks: int
    exp_ratio: float
    rib_hidden_dim: int = 32
    rib_n_freqs: int = 10
    pdim: int = 16
    kernel_size: int = 13
    conv_blocks: int = 5
    proj_ratio: float = 4.0
    intermediate_dim: int = 64

    @property
    def window_size(self) -> int:
        """The largest window (what single-window code such as tile planners needs)."""
        return max(self.window_sizes)

    @property
    def input_multiple(self) -> int:
        """Input sides that are multiples of this need no window padding in any layer.

        The least common multiple of the windows; for every published config it is the
        largest window (64 or 96).
        """
        return math.lcm(*self.window_sizes)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Window size of every attention layer, in the order the network runs them."""
        return self.window_sizes * self.n_blocks

    def structure(self) -> RIBConfig:
        """This config without what the weights cannot tell (the window sizes)."""
        return replace(self, window_sizes=())

    def as_dict(self) -> dict:
        return asdict(self)
