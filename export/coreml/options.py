"""What one Core ML export is asked for: targets, presets, sizes and the resolved config.

Why a module of its own: the command line (``export/to_coreml.py``), the library entry
points and the tests all build a :class:`CoreMLExportConfig`; the preset rules and the
option checks live here once, before any conversion code is imported.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.attention.backends import CoreMLBackend
from models.errors import ESCError

__all__ = [
    "BIAS_MODES", "COMPRESSIONS", "INPUT_NAME", "OUTPUT_NAME", "PRECISIONS", "PRESETS", "TARGETS",
    "CoreMLExportConfig", "CoreMLExportError", "PackageCheckError", "Preset", "default_output_path",
    "parse_shapes", "parse_size", "resolve_config", "shapes_text",
]

#: CLI target names -> the MIL opset (iOS name) they share; macOS 13/14/15 = iOS 16/17/18.
TARGETS: dict[str, str] = {
    "iOS16": "iOS16", "iOS17": "iOS17", "iOS18": "iOS18",
    "macOS13": "iOS16", "macOS14": "iOS17", "macOS15": "iOS18",
}
PRECISIONS = ("fp16", "fp32")
COMPRESSIONS = ("palettize4", "palettize8", "int8")
BIAS_MODES = CoreMLBackend.BIAS_MODES
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class CoreMLExportError(ESCError, ValueError):
    """A user-facing problem with a Core ML export (bad option, unconvertible model)."""


class PackageCheckError(CoreMLExportError):
    """A converted package failed a post-conversion check; it was not written."""


@dataclass(frozen=True)
class Preset:
    """Defaults for a device the ESC papers measured; explicit options override them."""

    name: str
    input_size: tuple[int, int]
    target: str
    precision: str
    device: str
    why: str


PRESETS: dict[str, Preset] = {
    "m2": Preset(
        "m2", (128, 128), "macOS15", "fp16", "MacBook Air M2",
        "the papers' Mac latency setting (128x128 input); macOS 15 has the iOS 18 opset, so "
        "window attention stays one fused scaled_dot_product_attention op"),
    "iphone": Preset(
        "iphone", (32, 32), "iOS17", "fp16", "iPhone 12",
        "the papers' iPhone setting (32x32 input, one attention window); iOS 17 runs on every "
        "iPhone that runs iOS 17 or 18 (XS / XR and later, iPhone 12 included); attention is "
        "decomposed into matmul + softmax, which the Neural Engine runs natively"),
}


def parse_size(text: str) -> tuple[int, int]:
    """``"128x96"`` (height x width) or ``"128"`` -> (128, 96) / (128, 128)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*,]\s*(\d+))?\s*", str(text))
    if not m:
        raise CoreMLExportError(f"input size {text!r} is not HEIGHTxWIDTH (e.g. 128x128)")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h < 1 or w < 1:
        raise CoreMLExportError(f"input size {text!r} must be at least 1x1")
    return h, w


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"enumerated:64x64,128x128"`` -> [(64, 64), (128, 128)] (order kept, duplicates dropped)."""
    kind, sep, rest = str(text).partition(":")
    if not sep or kind.strip().lower() != "enumerated":
        raise CoreMLExportError(
            f"--shapes {text!r}: expected enumerated:HxW,HxW,... (e.g. enumerated:64x64,128x128,256x256)")
    shapes: list[tuple[int, int]] = []
    for item in rest.split(","):
        if item.strip():
            size = parse_size(item)
            if size not in shapes:
                shapes.append(size)
    if not shapes:
        raise CoreMLExportError(f"--shapes {text!r} lists no shape")
    return shapes


def shapes_text(shapes: Sequence[tuple[int, int]], enumerated: bool) -> str:
    """``"128x128"`` for one fixed shape, ``"enumerated:64x64,128x128"`` for a set (``--shapes`` syntax)."""
    listed = ",".join(f"{h}x{w}" for h, w in shapes)
    return f"enumerated:{listed}" if enumerated else listed


@dataclass
class CoreMLExportConfig:
    """Everything one export needs (the CLI builds it with :func:`resolve_config`)."""

    model: str | None = "esc"      # None: recognised from the weights
    scale: int | None = 4          # None: from the weights (4 for random weights)
    weights: str | None = None
    input_size: tuple[int, int] | None = (128, 128)
    shapes: list[tuple[int, int]] | None = None  # enumerated shapes; overrides input_size
    precision: str = "fp16"
    target: str = "iOS18"
    image_io: bool = False
    compress: str | None = None
    bias: str = "table"
    output: Path | None = None
    preset: str | None = None

    @property
    def opset(self) -> str:
        return TARGETS[self.target]

    @property
    def declared_shapes(self) -> list[tuple[int, int]]:
        return list(self.shapes) if self.shapes else [tuple(self.input_size)]  # type: ignore[list-item]

    @property
    def enumerated(self) -> bool:
        return bool(self.shapes)

    @property
    def shape_text(self) -> str:
        """The declared input shape(s) as ``HxW`` or ``enumerated:HxW,...``."""
        return shapes_text(self.declared_shapes, self.enumerated)

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise CoreMLExportError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.precision not in PRECISIONS:
            raise CoreMLExportError(f"precision must be fp16 or fp32, not {self.precision!r}")
        if self.compress is not None and self.compress not in COMPRESSIONS:
            raise CoreMLExportError(f"unknown compression {self.compress!r}; choose one of {', '.join(COMPRESSIONS)}")
        if self.bias not in BIAS_MODES:
            raise CoreMLExportError(f"bias must be one of {', '.join(BIAS_MODES)}, not {self.bias!r}")
        if not self.shapes and not self.input_size:
            raise CoreMLExportError("give an input size (--input-size HxW) or enumerated shapes (--shapes)")


def resolve_config(model: str | None = "esc", scale: int | None = 4, weights: str | None = None, *,
                   preset: str | None = None, input_size: str | tuple[int, int] | None = None,
                   shapes: str | Sequence[tuple[int, int]] | None = None, precision: str | None = None,
                   target: str | None = None, image_io: bool = False, compress: str | None = None,
                   bias: str = "table", output: str | os.PathLike | None = None) -> CoreMLExportConfig:
    """Apply a preset, then explicit options (which win), and validate the result."""
    base = PRESETS.get(preset) if preset else None
    if preset and base is None:
        raise CoreMLExportError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if input_size is not None and shapes is not None:
        raise CoreMLExportError("--input-size and --shapes exclude each other: a package has either one fixed "
                                "input shape or a set of enumerated shapes")
    size = parse_size(input_size) if isinstance(input_size, str) else (tuple(input_size) if input_size else None)
    shape_list = parse_shapes(shapes) if isinstance(shapes, str) else ([tuple(s) for s in shapes] if shapes else None)
    if size is None and shape_list is None:
        size = base.input_size if base else (128, 128)
    cfg = CoreMLExportConfig(
        model=model, scale=scale, weights=weights, input_size=size if shape_list is None else None,
        shapes=shape_list, precision=precision or (base.precision if base else "fp16"),
        target=target or (base.target if base else "iOS18"), image_io=image_io, compress=compress,
        bias=bias, output=Path(output) if output else None, preset=preset)
    cfg.validate()
    return cfg


def default_output_path(cfg: CoreMLExportConfig) -> Path:
    """``artifacts/<variant>_x<scale>_<shape>_<target>_<precision>[_<compress>][_image].mlpackage``."""
    shape = ("enum" + "-".join(f"{h}x{w}" for h, w in cfg.declared_shapes)) if cfg.enumerated \
        else f"{cfg.input_size[0]}x{cfg.input_size[1]}"  # type: ignore[index]
    parts = [cfg.model or "model", f"x{cfg.scale}", shape, cfg.target, cfg.precision]
    if cfg.compress:
        parts.append(cfg.compress)
    if cfg.image_io:
        parts.append("image")
    return Path("artifacts") / ("_".join(parts) + ".mlpackage")
