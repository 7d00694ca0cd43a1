"""Recognise, build and strictly load ESC and RIB-family checkpoints (spandrel-style).

``load_model`` reads a checkpoint, infers the architecture and every hyper-parameter
from its keys and tensor shapes (for ESC-RIB and SST the window sizes, which the weights
do not hold, come from the caller's ``variant`` or the file name: see
:mod:`models.rib.infer`), builds the network, loads it with ``strict=True`` and returns it
in eval mode; ``create_model`` builds a variant by name.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from . import hub
from .base import ESCBase
from .config import ESCConfig, closest_variant, get_variant
from .errors import CheckpointError, ModelOptionError
from .esc import ESC
from .esc_fp import ESCFP
from .esc_real import ESCReal
from .rib.config import RIBConfig
from .rib.esc_rib import ESCRIB
from .rib.infer import infer_rib_config, is_rib_state_dict
from .rib.network import RIBNetwork
from .rib.sst import SST

StateDict = dict[str, torch.Tensor]
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
Model = ESCBase | RIBNetwork
ARCH_CLASSES: dict[str, type[Model]] = {"esc": ESC, "esc_fp": ESCFP, "esc_real": ESCReal, "esc_rib": ESCRIB, "sst": SST}


def read_state_dict(source: str | os.PathLike | Mapping) -> StateDict:
    """The state dict inside a ``.pth`` (``params_ema``/``params``/bare) or ``.safetensors``.

    A ``module.`` prefix (DataParallel) is removed. Pickles are read with
    ``weights_only=True``: a checkpoint cannot run code.
    """
    if isinstance(source, Mapping):
        obj = source
        origin = "the given state dict"
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise CheckpointError(
                f"no checkpoint file at {path}. Pass the path of an ESC .pth or .safetensors file, "
                f"or an official name such as official:ESC_DIV2K_X4.")
        obj = _read_file(path)
    for key in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{origin} holds no state dict of tensors (found {type(obj).__name__}"
            f"{' with keys ' + ', '.join(list(map(str, obj))[:5]) if isinstance(obj, Mapping) else ''}). "
            f"ESC checkpoints are dicts whose 'params_ema' or 'params' entry is the state dict.")
    return {re.sub(r"^module\.", "", k): v for k, v in obj.items()}


def _read_file(path: Path) -> object:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every reader failure becomes one explained error
        raise CheckpointError(
            f"could not read {path} as a checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            f"The file is truncated or corrupt (re-download it) or is not a PyTorch .pth / .safetensors "
            f"file; pickles that need code to load are refused on purpose (weights_only=True).") from exc


def infer_config(sd: StateDict, filename: str | None = None, variant: str | None = None) -> ESCConfig | RIBConfig:
    """Architecture and hyper-parameters from key names and tensor shapes.

    ``filename`` and ``variant`` only matter for RIB checkpoints (their window sizes).
    """
    if is_rib_state_dict(sd):
        return infer_rib_config(sd, filename, variant)
    if "lk_channel" in sd:
        arch = "esc_fp"
    elif "plk_filter" in sd:
        arch = "esc_real" if "skip.0.weight" in sd else "esc"
    else:
        raise CheckpointError(_not_esc_message(sd))
    try:
        dim = sd["proj.weight"].shape[0]
        pdim, kernel_size = (sd["lk_spatial"].shape[0], sd["lk_spatial"].shape[-1]) if arch == "esc_fp" \
            else (sd["plk_filter"].shape[0], sd["plk_filter"].shape[-1])
        n_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        conv_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.0\.convffns\.(\d+)\.proj\.weight", k))})
        heads, window, flashbias_rank = _attention_bias_shape(sd)
        exp_ratio = sd["blocks.0.convffns.0.proj.weight"].shape[0] / dim
        proj_ratio = sd["blocks.0.proj.proj.weight"].shape[0] / dim
        scale = 4 if arch == "esc_real" else math.isqrt(sd["to_img.weight"].shape[0] // 3)
    except KeyError as exc:
        raise CheckpointError(
            f"this {arch} checkpoint lacks the key {exc.args[0]!r}, so its shape cannot be inferred; "
            f"it is truncated or was saved from a modified network. "
            f"Found {len(sd)} tensors; compare with a checkpoint from the official release.") from exc
    return ESCConfig(
        arch=arch, scale=scale, dim=dim, pdim=pdim, kernel_size=kernel_size, n_blocks=n_blocks,
        conv_blocks=conv_blocks, window_size=window, num_heads=heads, exp_ratio=exp_ratio,
        proj_ratio=proj_ratio, use_lns="blocks.0.lns.0.weight" in sd, use_ln_last="ln_last.weight" in sd,
        flashbias_rank=flashbias_rank)


FLASHBIAS_KEYS = ("blocks.0.attn.flashbias_q", "blocks.0.attn.flashbias_k")


def _attention_bias_shape(sd: StateDict) -> tuple[int, int, int]:
    """(heads, window, FlashBias rank or 0) from the first block's bias tensors.

    A relative-position table is (heads, (2w-1)^2); FlashBias factors (upstream's 2025-12
    ``attn_type: FlashBias`` checkpoints) are two (heads, w^2, r) tensors. A file with one
    factor but not the other, or factors of different shapes, is a near miss named as such.
    """
    table_key = "blocks.0.attn.relative_position_bias"
    present = [k for k in FLASHBIAS_KEYS if k in sd]
    if table_key in sd and present:
        raise CheckpointError(
            f"this checkpoint has both a relative-position table ({table_key}) and FlashBias factors "
            f"({', '.join(present)}): upstream writes one or the other. Re-export it from the training code "
            f"with one attn_type.")
    if not present:
        if table_key not in sd:
            raise CheckpointError(
                f"this checkpoint has no attention bias for block 0: neither a relative-position table "
                f"({table_key}) nor FlashBias factors ({' and '.join(FLASHBIAS_KEYS)}). It is truncated or was "
                f"saved from a modified network; compare with a checkpoint from the official release.")
        table = sd[table_key]
        return table.shape[0], (math.isqrt(table.shape[1]) + 1) // 2, 0
    if len(present) == 1:
        missing = next(k for k in FLASHBIAS_KEYS if k not in sd)
        raise CheckpointError(
            f"this FlashBias checkpoint has {present[0]} but not {missing}: both factors are needed "
            f"(bias = flashbias_q @ flashbias_k^T). The file is truncated or was edited; re-download it.")
    f_q, f_k = sd[FLASHBIAS_KEYS[0]], sd[FLASHBIAS_KEYS[1]]
    tokens = f_q.shape[1] if f_q.dim() == 3 else -1
    window = math.isqrt(max(tokens, 0))
    if f_q.shape != f_k.shape or f_q.dim() != 3 or window * window != tokens:
        raise CheckpointError(
            f"FlashBias factors must be two equal (heads, window^2, rank) tensors; this checkpoint has "
            f"flashbias_q {tuple(f_q.shape)} and flashbias_k {tuple(f_k.shape)}. It was not written by "
            f"upstream's FlashBias code (or export/to_flashbias.py); re-download or re-convert it.")
    return f_q.shape[0], window, f_q.shape[2]


def _not_esc_message(sd: StateDict) -> str:
    keys = set(sd)
    best, best_share = None, 0.0
    for name in ("esc", "esc_fp", "esc_real"):
        ref = set(_reference_keys(name))
        share = len(keys & ref) / max(len(keys | ref), 1)
        if share > best_share:
            best, best_share = name, share
    sample = ", ".join(sorted(keys)[:4])
    return (f"not an ESC checkpoint: it has neither 'plk_filter' (ESC, ESC-Real) nor 'lk_channel' (ESC-FP) "
            f"nor RIB attention ('attn.to_hidden': ESC-RIB, SST). "
            f"Its {len(keys)} keys start with {sample}. Closest ESC variant by key overlap: {best} "
            f"({best_share:.0%} of keys shared). Check that the file is an ESC model from the official release.")


def _reference_keys(arch: str) -> list[str]:
    variant = {"esc": "esc", "esc_fp": "esc_fp", "esc_real": "esc_real"}[arch]
    config = get_variant(variant).build_config(4)
    with torch.device("meta"):
        return list(ARCH_CLASSES[arch](config).state_dict())


def build(config: ESCConfig | RIBConfig) -> Model:
    return ARCH_CLASSES[config.arch](config)


def load_state_dict_strict(model: Model, sd: StateDict) -> None:
    """``strict=True`` loading whose failure is one readable paragraph."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                   for k, v in sd.items() if k in expected and expected[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        name, _ = closest_variant(model.config)
        raise CheckpointError(
            f"the checkpoint does not fit the {model.config.arch} network inferred from it "
            f"(closest official variant: {name}): {_summarise('missing', missing)}"
            f"{_summarise('unexpected', unexpected)}{_summarise('wrong shape', wrong_shape)}"
            f"Re-download the checkpoint or check that it comes from the official ESC code.")
    model.load_state_dict(sd, strict=True)


def _summarise(label: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
    return f"{len(items)} {label} key(s) ({shown}); "


def load_model(source: str | os.PathLike | Mapping, attention: str = "sdpa", deploy: bool = True,
               scale: int | None = None, variant: str | None = None, device: str | torch.device | None = None,
               **attention_options) -> Model:
    """Read, recognise and strictly load an ESC or RIB-family checkpoint; returns an eval-mode model.

    ``source``: a ``.pth``/``.safetensors`` path, ``official:NAME`` or a state dict.
    ``scale`` / ``variant``: optional expectations, checked against what the weights say
    (for SST weights ``variant`` also picks the window sizes the weights cannot tell).
    ``deploy``: apply the exact deploy-time folds (see :meth:`ESCBase.deploy`).
    """
    if isinstance(source, str) and hub.is_official(source):
        source = hub.resolve(source)
    sd = read_state_dict(source)
    filename = None if isinstance(source, Mapping) else Path(source).name
    config = infer_config(sd, filename, variant)
    if scale is not None and scale != config.scale:
        raise CheckpointError(
            f"the weights are for x{config.scale} (the upsampler's output channels say so), "
            f"but x{scale} was asked for. Use weights trained for x{scale} or drop the scale option.")
    found, exact = closest_variant(config)
    if variant is not None:
        wanted = get_variant(variant).name
        if wanted != found or not exact:
            raise CheckpointError(
                f"the weights are {'an' if exact else 'closest to'} {found} x{config.scale} network, "
                f"not {wanted}. Drop the variant option to use them as they are, or pass {wanted} weights.")
    model = build(config)
    load_state_dict_strict(model, sd)
    return _ready(model, attention, attention_options, device, deploy)


def create_model(name: str, scale: int, weights: str | os.PathLike | Mapping | None = None,
                 attention: str = "sdpa", deploy: bool = False, device: str | torch.device | None = None,
                 seed: int | None = 0, flashbias_rank: int = 0, **attention_options) -> Model:
    """Build the named variant; with ``weights``, load them strictly (checked against the name).

    Without weights the network gets random weights and a warning: its output is
    meaningless, but its speed and export behaviour are the real ones. ``flashbias_rank``
    r > 0 builds the FlashBias form (factors of rank r instead of bias tables; ESC family).
    """
    spec = get_variant(name)
    if weights is not None:
        model = load_model(weights, attention=attention, deploy=deploy, scale=scale, variant=spec.name,
                           device=device, **attention_options)
        found = getattr(model.config, "flashbias_rank", 0)
        if flashbias_rank and found != flashbias_rank:
            raise ModelOptionError(
                f"flashbias_rank={flashbias_rank} was asked for, but the weights hold "
                f"{model.descriptor.bias}. Drop the option (the weights decide), or convert them with "
                f"python export/to_flashbias.py --rank {flashbias_rank}.")
        return model
    config = spec.build_config(scale)
    if flashbias_rank:
        if not isinstance(config, ESCConfig):
            raise ModelOptionError(f"{spec.name} has no bias table to replace: FlashBias factors apply to the ESC "
                                  f"family (esc, esc_light, esc_fp, esc_real, esc_xl), not to RIB models.")
        config = replace(config, flashbias_rank=flashbias_rank)
    warnings.warn(f"{spec.name} x{scale} built with random weights: its output is meaningless "
                  f"(fine for latency and export checks). Pass weights=... for real pictures.", stacklevel=2)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = build(config)
        randomise(model)
    return _ready(model, attention, attention_options, device, deploy)


def _ready(model: Model, attention: str, attention_options: dict, device: str | torch.device | None,
           deploy: bool) -> Model:
    """The steps every built model takes: attention back-end, device, deploy folds, eval mode.

    Folding after the move keeps the precomputed tensors (dense bias, folded kernels) on
    the model's device.
    """
    model.set_attention(attention, **attention_options)
    if device is not None:
        model.to(device)
    if deploy:
        model.deploy()
    return model.eval()


@torch.no_grad()
def randomise(model: Model) -> None:
    """Give the tensors our constructors leave at zero a non-trivial random value.

    The RIB bias MLP gets upstream's initialisation (normal, std 0.05).
    """
    for name, p in model.named_parameters():
        if name.endswith(("plk_filter", "lk_channel", "lk_spatial")):
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
        elif name.endswith("relative_position_bias"):
            p.normal_(0.0, 0.02)
        elif name.endswith(("flashbias_q", "flashbias_k")):   # products of about the table's size
            p.normal_(0.0, (0.02 / p.shape[-1] ** 0.5) ** 0.5)
        elif name.endswith(("attn.to_hidden", "attn.to_q", "attn.to_k")):
            p.normal_(0.0, 0.05)
