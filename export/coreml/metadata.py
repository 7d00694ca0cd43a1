"""What a Core ML package says about itself: ``esc.*`` metadata and the descriptions Xcode shows.

The ``esc.*`` keys come from the one schema (:class:`runtimes.metadata.ArtifactMetadata`);
Core ML's own facts (``tile``, ``shape_mode``, ``compression``, ``target``, ``preset``,
``image_io``, ``attention_bias``) go in as its format extras, so the runner reads them
back with :func:`runtimes.metadata.read_coreml_metadata` like any other key.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from runtimes.metadata import ArtifactMetadata, toolkit_version

from .options import INPUT_NAME, OUTPUT_NAME, CoreMLExportConfig

__all__ = ["WEIGHTS_LICENSE", "apply_metadata", "artifact_metadata"]

WEIGHTS_LICENSE = ("MIT (ESC code and official weights, Lee, Yun & Ro, ICCV 2025: "
                   "https://github.com/dslisleedh/ESC)")


def artifact_metadata(cfg: CoreMLExportConfig, model: nn.Module | None, sha: str | None) -> ArtifactMetadata:
    """The package's metadata: the model's descriptor (when ``model`` is an ESC model) plus ``cfg``'s choices."""
    fields: dict[str, Any] = dict(
        scale=cfg.scale, precision=cfg.precision, io_dtype="float32", batch="1",
        shape=None if cfg.enumerated else cfg.shape_text, tile=cfg.shape_text,
        shape_mode="enumerated" if cfg.enumerated else "fixed", compression=cfg.compress or "none",
        target=cfg.target, attention_bias=cfg.bias, image_io="true" if cfg.image_io else "false")
    if cfg.preset:
        fields["preset"] = cfg.preset
    if hasattr(model, "descriptor"):
        return ArtifactMetadata.from_model(model, sha, **fields)
    # Any other module (tests convert wrappers and toy modules): the config is all there is.
    fields.update(variant=cfg.model, weights_sha256=sha or "random", toolkit_version=toolkit_version())
    return ArtifactMetadata.from_props({f"esc.{k}": v for k, v in fields.items() if v is not None})


def apply_metadata(ml: Any, cfg: CoreMLExportConfig, meta: ArtifactMetadata) -> None:
    """Write ``meta`` into ``ml.user_defined_metadata`` and fill the human-readable descriptions."""
    random_weights = meta.weights_sha256 in (None, "random")
    inputs = f"enumerated shapes {cfg.shape_text[len('enumerated:'):]}" if cfg.enumerated else cfg.shape_text
    ml.short_description = (
        f"ESC {meta.variant} x{cfg.scale} image super-resolution (ICCV 2025). Input: RGB "
        f"{'image' if cfg.image_io else 'float32 tensor in [0, 1]'}, {inputs}; output {cfg.scale}x larger.")
    ml.author = ("random weights (esc-deploy test export)" if random_weights
                 else "ESC: Dongheon Lee, Seokju Yun, Youngmin Ro (weights: official ESC release)")
    ml.license = "no weights (random initialisation)" if random_weights else WEIGHTS_LICENSE
    ml.version = meta.toolkit_version
    ml.input_description[INPUT_NAME] = (
        "RGB image; Core ML scales its 0..255 pixels by 1/255" if cfg.image_io
        else "RGB, NCHW float32 in [0, 1], batch 1")
    ml.output_description[OUTPUT_NAME] = (
        "RGB image, upscaled" if cfg.image_io else "RGB, NCHW float32, upscaled; not clamped (clamp to [0, 1])")
    ml.user_defined_metadata.update(meta.to_props())
