"""Recognise a RIB checkpoint: the structure from the weights, the windows from a name.

The weights fix every size but the window sizes, so ``sst`` and ``sst_plus`` (and
``sst_large`` / ``sst_large_plus``) are indistinguishable by their tensors. The variant
comes from the caller, else from the structure when only one published variant has it,
else from the file name as upstream's releases are named: ``plus`` in it (any case) means
the plus variant, a name that says ``sst`` without ``plus`` (``SST_DF2K_X4.pth``) the plain
one. Only a name that says neither (``model.pth``) stops loading, naming both candidates
rather than guess.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from ..config import VARIANTS, Variant, get_variant
from ..errors import CheckpointError
from .config import RIBArch, RIBConfig

StateDict = Mapping[str, torch.Tensor]


def is_rib_state_dict(sd: StateDict) -> bool:
    """RIB attention layers carry the bias MLP's ``to_hidden``; nothing else in the toolkit does."""
    return any(k.endswith("attn.to_hidden") for k in sd)


def infer_rib_config(sd: StateDict, filename: str | None = None, variant: str | None = None) -> RIBConfig:
    """The full config: structure from shapes, windows from ``variant`` or ``filename``."""
    try:
        structure = _structure(sd)
    except KeyError as exc:
        raise CheckpointError(
            f"this RIB checkpoint lacks the key {exc.args[0]!r}, so its shape cannot be inferred; it is truncated "
            f"or was saved from a modified network. Found {len(sd)} tensors; compare with a checkpoint from "
            f"the official release.") from exc
    candidates = [v for v in VARIANTS.values() if isinstance(v.config, RIBConfig)
                  and v.config.structure() == replace(structure, scale=0)]
    chosen = _choose(candidates, structure, filename, variant)
    return chosen.build_config(structure.scale)


def _choose(candidates: list[Variant], structure: RIBConfig, filename: str | None, variant: str | None) -> Variant:
    names = [v.name for v in candidates]
    what = f"{structure.arch} x{structure.scale} weights (dim {structure.dim}, {structure.n_blocks} blocks)"
    if variant is not None:
        wanted = get_variant(variant)
        if wanted.name in names:
            return wanted
        fits = f"they fit {' and '.join(names)}" if names else "no published variant has their shapes"
        raise CheckpointError(
            f"these are {what}, not {wanted.name}: {fits}. Drop the variant option to use them as they are, "
            f"or pass {wanted.name} weights.")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"these {what} match no published RIB variant (window sizes are not stored in RIB weights, so only "
            f"the published configs can be rebuilt: {', '.join(v.name for v in VARIANTS.values() if isinstance(v.config, RIBConfig))}). "
            f"Check that the file comes from the official release.")
    name = (filename or "").lower()
    if "plus" in name or "sst" in name:
        named = [v for v in candidates if v.name.endswith("_plus") == ("plus" in name)]
        if len(named) == 1:
            return named[0]
    shown = " and ".join(f"{v.name} (windows {'/'.join(map(str, v.config.window_sizes))})" for v in candidates)
    source = (f"the file name {filename!r} says neither 'sst' nor 'plus'" if filename
              else "no file name was given")
    raise CheckpointError(
        f"these {what} fit both {shown}: the two differ only in their window sizes, which the weights do not "
        f"store, and {source}, so the toolkit will not guess. Pass variant={names[0]!r} or variant={names[-1]!r} "
        f"(or name the file as upstream does: SST_..., SST_Plus_...).")


def _count(sd: StateDict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def _attention_shapes(sd: StateDict, prefixes: list[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    heads = tuple(sd[f"{p}.attn.to_q"].shape[0] for p in prefixes)
    ranks = tuple(sd[f"{p}.attn.to_q"].shape[-1] for p in prefixes)
    return heads, ranks


def _structure(sd: StateDict) -> RIBConfig:
    """Everything the shapes say; the window sizes are left empty."""
    arch: RIBArch = "esc_rib" if "plk_filter" in sd else "sst"
    dim = sd["proj.weight"].shape[0]
    if arch == "esc_rib":
        first = "blocks.0"
        n_blocks = _count(sd, r"blocks\.(\d+)\.")
        layers = [first]
        extra = {"pdim": sd["plk_filter"].shape[0], "kernel_size": sd["plk_filter"].shape[-1],
                 "conv_blocks": _count(sd, r"blocks\.0\.convffns\.(\d+)\.proj\.weight"),
                 "proj_ratio": sd["blocks.0.proj.proj.weight"].shape[0] / dim}
        exp_ratio = sd["blocks.0.convffns.0.proj.weight"].shape[0] / dim
        scale = math.isqrt(sd["upsampler.up_conv.weight"].shape[0] // 3)
    else:
        first = "body.0.0"
        n_blocks = _count(sd, r"body\.(\d+)\.0\.attn\.to_hidden")
        layers = [f"body.0.{j}" for j in range(_count(sd, r"body\.0\.(\d+)\.attn\.to_hidden"))]
        features = sd["upsampler.feature_conv.weight"].shape[0]
        extra = {"intermediate_dim": features}
        exp_ratio = sd["body.0.0.ffn.proj.weight"].shape[0] / dim
        scale = math.isqrt(sd["upsampler.up_conv.weight"].shape[0] // features)
    heads, ranks = _attention_shapes(sd, layers)
    hidden = sd[f"{first}.attn.to_hidden"]
    return RIBConfig(arch=arch, scale=scale, dim=dim, window_sizes=(), num_heads=heads, ranks=ranks,
                     n_blocks=n_blocks, exp_ratio=exp_ratio, rib_hidden_dim=hidden.shape[1],
                     rib_n_freqs=(hidden.shape[0] - 2) // 4, **extra)
