"""The PyTorch model as the Core ML exporter converts it, built on a copy of the caller's.

Why a copy: an exporter that switched the caller's attention back-end or kernel form
would silently change what the caller's model computes afterwards (and how fast). The
forms themselves are model options (``models/``):

- ``ane`` (:func:`models.ane.ane_form`): rank-4 tensors, the attention bias as per-head
  constants, no gathers, fixed shapes: what the Neural Engine compiles;
- ``compat``: attention ``"coreml"`` (SDPA with no explicit scale and the bias gathered
  from its small table, :class:`models.attention.CoreMLBackend`) and the compact dynamic
  3x3 form ``set_dynamic_kernel_form("conv")``: any target, enumerated shapes, small package.

RIB models (ESC-RIB, SST) have no bias table: their factors are folded into constants by
``deploy`` and their mask-free ``sdpa`` back-end is converted as is (``compat`` only).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from export.common import resolve_weights_arg

from .options import CoreMLExportConfig, CoreMLExportError
from .safety import Fp16Safety, make_safe_for_fp16

__all__ = ["ImageIO", "ane_options", "build_model", "export_copy", "is_rib_model", "prepare_model"]


class ImageIO(nn.Module):
    """``clamp(model(x / 255) * 255, 0, 255)``: 0..255 image pixels in and out.

    The scaling lives in the model rather than in ``ct.ImageType(scale=...)``: there
    coremltools applies it in fp32 before the input cast, an fp32 op the Neural Engine
    does not run; here it runs in the program's compute precision.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.model(x * (1.0 / 255.0)) * 255.0, 0.0, 255.0)


def is_rib_model(model: nn.Module) -> bool:
    """ESC-RIB / SST: attention with folded positional factors instead of a bias table."""
    from models.rib.network import RIBNetwork

    return isinstance(model, RIBNetwork)


def prepare_model(model: nn.Module, bias: str = "table", form: str = "compat", **ane_options) -> nn.Module:
    """A deployed copy of an ESC (or RIB) model in the export ``form``; the caller's model is left as it was.

    ``ane_options`` go to :func:`models.ane.ane_form` (``budget``, ``large_kernel_pieces``,
    ``mean_as_conv``) for the ANE form.
    """
    if not hasattr(model, "attention_modules"):
        raise CoreMLExportError(f"{type(model).__name__} is not an ESC model (no attention modules)")
    prepared = copy.deepcopy(model)
    if is_rib_model(prepared):
        if form == "ane":
            raise CoreMLExportError(f"{type(model).__name__} (a RIB model) has no ANE form yet; export it with "
                                    f"--form compat (its mask-free SDPA attention)")
        prepared.deploy(precompute_bias=True)
        return prepared.set_attention("sdpa").eval()
    if form == "ane":
        return prepared.ane_form(**ane_options)
    prepared.deploy(precompute_bias=bias == "dense")
    prepared.set_attention("coreml", bias=bias)
    return prepared.eval()


def export_copy(module: nn.Module, image_io: bool) -> nn.Module:
    """The module that is traced: a copy, every compat-form ESC model inside in the compact
    kernel form (the ANE form has its own), wrapped in :class:`ImageIO` for image packages."""
    from models.ane import AneModel

    traced = copy.deepcopy(module).eval()
    ane_models = [sub.model for sub in traced.modules() if isinstance(sub, AneModel)]
    for sub in traced.modules():  # ``module`` may wrap the model
        if hasattr(sub, "set_dynamic_kernel_form") and not any(sub is m for m in ane_models):
            sub.set_dynamic_kernel_form("conv")
    return ImageIO(traced) if image_io else traced


def ane_options(cfg: CoreMLExportConfig) -> dict:
    """The :func:`models.ane.ane_form` options of ``cfg`` (empty for the compat form)."""
    if cfg.form != "ane":
        return {}
    return {"budget": cfg.score_budget, "large_kernel_pieces": cfg.large_kernel_pieces,
            "mean_as_conv": cfg.mean_as_conv}


def build_model(cfg: CoreMLExportConfig) -> tuple[nn.Module, str | None, Fp16Safety | None]:
    """The deployed model for ``cfg`` in its form, the weights' sha256 (None for random weights)
    and, for fp16 exports, the fp16 safety report (:mod:`.safety`).

    Weights are read as every exporter reads them (:func:`export.common.resolve_weights_arg`:
    strict load, variant and scale checked against ``cfg.model`` / ``cfg.scale`` when
    given); ``cfg.model`` and ``cfg.scale`` are then set to what the weights are. fp16
    safety runs on the PyTorch model before its export form is made (a rescaled LayerNorm
    folds like any other).
    """
    model, sha = resolve_weights_arg(cfg.model, cfg.scale, cfg.weights, deploy=False)
    cfg.model = model.descriptor.variant
    cfg.scale = model.scale
    safety = None
    if cfg.precision == "fp16":
        model, safety = make_safe_for_fp16(model, cfg)
    return prepare_model(model, cfg.bias, cfg.form, **ane_options(cfg)), sha, safety
