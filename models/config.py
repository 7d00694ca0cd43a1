"""Hyper-parameters of the ESC and RIB families and their published variants.

An :class:`ESCConfig` (or a :class:`~models.rib.config.RIBConfig`) is everything needed to
build a network; the loader infers one from a checkpoint's keys and shapes (plus, for RIB,
the file name or the caller: window sizes are not in the weights), and :data:`VARIANTS`
names the official ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from .errors import UnknownVariantError
from .rib.config import RIBConfig

Arch = Literal["esc", "esc_fp", "esc_real"]


@dataclass(frozen=True)
class ESCConfig:
    """What the network looks like; the field names follow upstream's constructors."""

    arch: Arch
    scale: int
    dim: int
    pdim: int = 16
    kernel_size: int = 13
    n_blocks: int = 5
    conv_blocks: int = 5
    window_size: int = 32
    num_heads: int = 4
    exp_ratio: float = 1.25
    proj_ratio: float = 2.0
    use_lns: bool = False
    use_ln_last: bool = False
    #: 0: each block's bias is a relative-position table; r > 0: FlashBias factors of rank r
    #: (upstream's ``attn_type: FlashBias``, ``flashbias_rank``), the same variant otherwise.
    flashbias_rank: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Variant:
    """A published variant: its config (less the scale), scales and paper figures."""

    name: str
    title: str
    config: ESCConfig | RIBConfig
    scales: tuple[int, ...]
    # Parameter counts as published (thousands), where the papers state them per scale.
    paper_params_k: dict[int, float] = field(default_factory=dict)
    notes: str = ""

    def build_config(self, scale: int) -> ESCConfig | RIBConfig:
        if scale not in self.scales:
            raise UnknownVariantError(
                f"{self.name} is published at scale(s) {', '.join(f'x{s}' for s in self.scales)}, not x{scale}. "
                f"Pick one of those scales, or pass weights whose upsampler fixes the scale.")
        return replace(self.config, scale=scale)


# SST sizes and the two window schedules (per layer of a block), from upstream's test configs.
SST_WINDOWS = (16, 32, 64, 16, 32, 64)
SST_PLUS_WINDOWS = (16, 32, 48, 32, 48, 96)
SST_BASE = {"dim": 180, "num_heads": (6,) * 6, "ranks": (18, 18, 18, 34, 34, 34), "n_blocks": 6, "exp_ratio": 1.25}
SST_LARGE = {"dim": 192, "num_heads": (6,) * 6, "ranks": (16, 16, 16, 32, 32, 32), "n_blocks": 8, "exp_ratio": 2.0,
             "intermediate_dim": 96}
SST_XL = {**SST_LARGE, "dim": 224, "num_heads": (7,) * 6, "n_blocks": 10}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("esc", "ESC", ESCConfig("esc", 0, dim=64), (2, 3, 4),
                notes="no LayerNorm before the ConvFFNs"),
        Variant("esc_light", "ESC-light", ESCConfig("esc", 0, dim=64, n_blocks=3), (2, 3, 4)),
        Variant("esc_fp", "ESC-FP", ESCConfig("esc_fp", 0, dim=48, num_heads=3, proj_ratio=1.5,
                                              use_lns=True, use_ln_last=True), (2, 3, 4),
                notes="decomposed large kernel, bicubic image skip"),
        Variant("esc_real", "ESC-Real", ESCConfig("esc_real", 0, dim=64, n_blocks=10, exp_ratio=2.0,
                                                  use_lns=True), (4,),
                notes="real-world x4 (nearest+conv upsampler)"),
        Variant("esc_xl", "ESC-XL", ESCConfig("esc", 0, dim=192, pdim=48, n_blocks=8, window_size=48,
                                              num_heads=12, use_lns=True), (2, 3, 4),
                paper_params_k={s: 12500.0 for s in (2, 3, 4)},
                notes="large: LayerNorm before the ConvFFNs, 48x48 windows"),
        Variant("esc_rib", "ESC-RIB", RIBConfig("esc_rib", 0, dim=64, window_sizes=(64,), num_heads=(4,),
                                                ranks=(16,), n_blocks=5, exp_ratio=1.25), (2, 3, 4),
                notes="ESC with one RIB attention per block, 64x64 windows"),
        *(Variant(name, title, RIBConfig("sst", 0, window_sizes=windows, **size), (2, 3, 4), notes=notes)
          for name, title, windows, size, notes in (
              ("sst", "SST", SST_WINDOWS, SST_BASE, "windows 16/32/64"),
              ("sst_plus", "SST+", SST_PLUS_WINDOWS, SST_BASE, "windows up to 96; same weights' shapes as sst"),
              ("sst_large", "SST-Large", SST_WINDOWS, SST_LARGE, "windows 16/32/64"),
              ("sst_large_plus", "SST-Large+", SST_PLUS_WINDOWS, SST_LARGE,
               "windows up to 96; same weights' shapes as sst_large"),
              ("sst_xl_plus", "SST-XL+", SST_PLUS_WINDOWS, SST_XL, "windows up to 96"))),
    )
}


def get_variant(name: str) -> Variant:
    """Look a variant up by name, accepting ``esc-light`` / ``ESC_light`` spellings."""
    key = name.strip().lower().replace("-", "_")
    if key not in VARIANTS:
        import difflib

        close = difflib.get_close_matches(key, VARIANTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownVariantError(
            f"unknown ESC variant {name!r}: the toolkit knows {', '.join(VARIANTS)}.{hint}")
    return VARIANTS[key]


def closest_variant(config: ESCConfig | RIBConfig) -> tuple[str, bool]:
    """Name the official variant of the same family nearest to ``config`` and whether it matches exactly.

    The form of the attention bias (a table or FlashBias factors) is not part of a variant:
    upstream releases both forms of esc and esc_real, and the descriptor states it apart.
    """
    def distance(v: Variant) -> int:
        ref = replace(v.config, scale=config.scale)
        return sum(getattr(ref, f) != getattr(config, f) for f in ref.__dataclass_fields__ if f != "flashbias_rank")

    best = min((v for v in VARIANTS.values() if type(v.config) is type(config)), key=distance)
    return best.name, distance(best) == 0
