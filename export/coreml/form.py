"""The PyTorch model as the Core ML exporter converts it, built on a copy of the caller's.

Why a copy: an exporter that switched the caller's attention back-end or kernel form
would silently change what the caller's model computes afterwards (and how fast). The
forms themselves are model options (``models/``): attention ``"coreml"`` (SDPA with no
explicit scale and the bias gathered from its table, :class:`models.attention.CoreMLBackend`)
and the compact dynamic 3x3 form ``set_dynamic_kernel_form("conv")`` (ESC's program
drops from ~2100 to ~710 ops, conversion takes half the time).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from export.common import resolve_weights_arg

from .options import CoreMLExportConfig, CoreMLExportError

__all__ = ["ImageOutput", "build_model", "export_copy", "prepare_model"]


class ImageOutput(nn.Module):
    """``clamp(model(x) * 255, 0, 255)``: what a Core ML image output needs (no output scale)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.model(x) * 255.0, 0.0, 255.0)


def prepare_model(model: nn.Module, bias: str = "table") -> nn.Module:
    """A deployed copy of an ESC model with the ``coreml`` attention in every block.

    The caller's model is left as it was (attention back-end, folds, weights).
    """
    if not hasattr(model, "attention_modules"):
        raise CoreMLExportError(f"{type(model).__name__} is not an ESC model (no attention modules)")
    prepared = copy.deepcopy(model)
    prepared.deploy(precompute_bias=bias == "dense")
    prepared.set_attention("coreml", bias=bias)
    return prepared.eval()


def export_copy(module: nn.Module, image_io: bool) -> nn.Module:
    """The module that is traced: a copy, every ESC model inside in the compact kernel form,
    wrapped in :class:`ImageOutput` for image packages."""
    traced = copy.deepcopy(module).eval()
    for sub in traced.modules():  # ``module`` may wrap the model
        if hasattr(sub, "set_dynamic_kernel_form"):
            sub.set_dynamic_kernel_form("conv")
    return ImageOutput(traced) if image_io else traced


def build_model(cfg: CoreMLExportConfig) -> tuple[nn.Module, str | None]:
    """The deployed ESC model for ``cfg`` and the weights' sha256 (None for random weights).

    Weights are read as every exporter reads them (:func:`export.common.resolve_weights_arg`:
    strict load, variant and scale checked against ``cfg.model`` / ``cfg.scale`` when
    given); ``cfg.model`` and ``cfg.scale`` are then set to what the weights are.
    """
    model, sha = resolve_weights_arg(cfg.model, cfg.scale, cfg.weights, deploy=False)
    cfg.model = model.descriptor.variant
    cfg.scale = model.scale
    return prepare_model(model, cfg.bias), sha
