"""What a Core ML package says about itself: ``esc.*`` metadata and the descriptions Xcode shows.

The ``esc.*`` keys come from the one schema (:class:`runtimes.metadata.ArtifactMetadata`);
Core ML's own facts (``tile``, ``shape_mode``, ``functions``, ``tiling``, ``form``,
``compression``, ``target``, ``preset``, ``image_io``, ``attention_bias``, ``license``,
``source_weights``) go in as its format extras, so the runner reads them back with
:func:`runtimes.metadata.read_coreml_metadata` like any other key. A multifunction
package carries them once, at the top (:func:`copy_package_metadata`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from runtimes.metadata import ArtifactMetadata, toolkit_version

from .options import INPUT_NAME, OUTPUT_NAME, CoreMLExportConfig

__all__ = ["WEIGHTS_LICENSE", "apply_metadata", "artifact_metadata", "copy_package_metadata", "function_name"]

WEIGHTS_LICENSE = ("MIT (ESC code and official weights, Lee, Yun & Ro, ICCV 2025: "
                   "https://github.com/dslisleedh/ESC)")


def function_name(h: int, w: int) -> str:
    """The multifunction package's function for one tile: ``tile_<W>x<H>``."""
    return f"tile_{w}x{h}"


def _tiling_text(cfg: CoreMLExportConfig, window: int) -> str:
    """How an app tiles an image for this package (the ``esc.tiling`` entry)."""
    if cfg.multifunction:
        pick = ("pick the function whose tile is the largest that fits ("
                + ", ".join(f"{function_name(h, w)}" for h, w in cfg.declared_shapes) + "); ")
    else:
        pick = ""
    return (f"{pick}cut the image into tiles of that size starting on the {window}-pixel window grid, with "
            f">= 96 px of overlap (the model's reach); pad the last tiles by edge replication; "
            f"keep each tile's centre, scaled by {cfg.scale}")


def artifact_metadata(cfg: CoreMLExportConfig, model: nn.Module | None, sha: str | None) -> ArtifactMetadata:
    """The package's metadata: the model's descriptor (when ``model`` is an ESC model) plus ``cfg``'s choices."""
    fields: dict[str, Any] = dict(
        scale=cfg.scale, precision=cfg.precision, io_dtype="float16" if cfg.io_dtype == "fp16" else "float32",
        batch="1",
        # The metadata schema writes sizes HxW (runtimes.metadata); the command line takes WxH.
        shape=None if cfg.enumerated or cfg.multifunction else f"{cfg.declared_shapes[0][0]}x{cfg.declared_shapes[0][1]}",
        tile=("enumerated:" if cfg.enumerated else "") + ",".join(f"{h}x{w}" for h, w in cfg.declared_shapes),
        shape_mode="enumerated" if cfg.enumerated else "fixed", compression=cfg.compress or "none",
        target=cfg.target, attention_bias=cfg.bias, image_io="true" if cfg.image_io else "false",
        form=cfg.form, tiling=_tiling_text(cfg, getattr(getattr(model, "config", None), "window_size", None) or 32),
        license=WEIGHTS_LICENSE if sha else "no weights (random)",
        source_weights=os.path.basename(cfg.weights) if cfg.weights else "random")
    if cfg.multifunction:
        fields["functions"] = ",".join(function_name(h, w) for h, w in cfg.declared_shapes)
        fields["shape_mode"] = "multifunction"
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
    inputs = (f"enumerated shapes {cfg.shape_text[len('enumerated:'):]}" if cfg.enumerated
              else f"one function per tile {cfg.shape_text}" if cfg.multifunction else cfg.shape_text)
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


def copy_package_metadata(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the top-level description (metadata, author, license, ...) of ``source``'s spec into ``target``'s.

    Why: coremltools' ``save_multifunction`` keeps each function's input and output
    descriptions but not the model-level metadata; the package is rewritten in place
    (it is still in its temporary directory, so nothing half-written is ever visible).
    """
    from coremltools.proto import Model_pb2

    def spec_file(path: str | os.PathLike) -> Path:
        return Path(path) / "Data" / "com.apple.CoreML" / "model.mlmodel"

    src, dst = Model_pb2.Model(), Model_pb2.Model()
    src.ParseFromString(spec_file(source).read_bytes())
    dst.ParseFromString(spec_file(target).read_bytes())
    dst.description.metadata.CopyFrom(src.description.metadata)
    spec_file(target).write_bytes(dst.SerializeToString())
