"""What one Core ML export is asked for: targets, presets, sizes and the resolved config.

Why a module of its own: the command line (``export/to_coreml.py``), the library entry
points and the tests all build a :class:`CoreMLExportConfig`; the preset rules and the
option checks live here once, before any conversion code is imported.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models.ane.budget import DEFAULT_BUDGET_BYTES
from models.attention.backends import CoreMLBackend
from models.errors import ESCError
from runtimes.cli_args import SizeSyntaxError, format_size
from runtimes.cli_args import parse_size as parse_cli_size

__all__ = [
    "BIAS_MODES", "COMPRESSIONS", "FORMS", "INPUT_NAME", "IO_DTYPES", "MULTIFUNCTION_OPSETS", "OUTPUT_NAME",
    "PRECISIONS", "PRESETS", "TARGETS", "CoreMLExportConfig", "CoreMLExportError", "PackageCheckError", "PackageParityError", "Preset",
    "default_output_path", "parse_budget", "parse_shapes", "parse_size", "parse_tiles", "resolve_config", "shapes_text",
]

#: CLI target names -> the MIL opset (iOS name) they share; macOS 13/14/15 = iOS 16/17/18.
TARGETS: dict[str, str] = {
    "iOS16": "iOS16", "iOS17": "iOS17", "iOS18": "iOS18",
    "macOS13": "iOS16", "macOS14": "iOS17", "macOS15": "iOS18",
}
PRECISIONS = ("fp16", "fp32")
COMPRESSIONS = ("palettize4", "palettize8", "int8")
BIAS_MODES = CoreMLBackend.BIAS_MODES
#: ``ane``: the Neural Engine form (models.ane: rank 4, constant bias, no gathers, fixed shapes);
#: ``compat``: the portable form (any target, enumerated shapes, small package).
FORMS = ("ane", "compat")
IO_DTYPES = ("fp32", "fp16")
#: Opsets whose packages may hold several functions (coremltools' multifunction API).
MULTIFUNCTION_OPSETS = ("iOS18",)
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class CoreMLExportError(ESCError, ValueError):
    """A user-facing problem with a Core ML export (bad option, unconvertible model)."""


class PackageCheckError(CoreMLExportError):
    """A converted package failed a post-conversion check; it was not written."""


class PackageParityError(CoreMLExportError):
    """A written package does not reproduce PyTorch; ``rows`` are the per-shape results to print."""

    def __init__(self, message: str, rows: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


@dataclass(frozen=True)
class Preset:
    """Defaults for a device class; explicit options override them.

    ``tiles``: the app-sized tiles shipped by default (one static function each);
    ``paper_size``: the input size of the papers' Table 9 (``--paper-size``).
    """

    name: str
    tiles: tuple[tuple[int, int], ...]
    paper_size: tuple[int, int]
    target: str
    precision: str
    device: str
    why: str


PRESETS: dict[str, Preset] = {
    "m2": Preset(
        "m2", ((128, 128), (256, 256)), (128, 128), "macOS15", "fp16", "Apple silicon Mac (M2)",
        "Table 9 measured a MacBook Air M2 at 128x128; macOS 15 packages hold one static function per tile"),
    "iphone": Preset(
        "iphone", ((128, 128), (256, 256)), (32, 32), "iOS18", "fp16", "iPhone (A14 and later)",
        "Table 9 measured an iPhone 12 at 32x32; iOS 18 packages hold one static function per tile"),
}


def parse_budget(text: str | int | float) -> int:
    """``"8"`` / ``8`` (MiB) -> bytes: the ANE form's tensor budget (``--score-budget``)."""
    try:
        mib = float(text)
    except (TypeError, ValueError):
        raise CoreMLExportError(f"--score-budget takes a number of MiB (e.g. 8 or 0.5), got {text!r}") from None
    if not mib > 0 or mib != mib or mib == float("inf"):
        raise CoreMLExportError(f"--score-budget must be a positive number of MiB, got {text!r}")
    return max(2, int(round(mib * 2**20)))


def parse_size(text: str) -> tuple[int, int]:
    """``"160x128"`` (WIDTHxHEIGHT, the project's one size syntax) -> (128, 160) (height, width)."""
    try:
        return parse_cli_size(text)
    except SizeSyntaxError as exc:
        raise CoreMLExportError(f"input size: {exc}") from None


def _size_list(text: str, what: str, example: str) -> list[tuple[int, int]]:
    sizes: list[tuple[int, int]] = []
    for item in str(text).split(","):
        if item.strip():
            size = parse_size(item)
            if size not in sizes:
                sizes.append(size)
    if not sizes:
        raise CoreMLExportError(f"{what} {text!r} lists no size (e.g. {example})")
    return sizes


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"enumerated:64x64,128x96"`` -> [(64, 64), (96, 128)] (order kept, duplicates dropped)."""
    kind, sep, rest = str(text).partition(":")
    if not sep or kind.strip().lower() != "enumerated":
        raise CoreMLExportError(
            f"--shapes {text!r}: expected enumerated:WxH,WxH,... (e.g. enumerated:64x64,128x128,256x256)")
    return _size_list(rest, "--shapes", "enumerated:64x64,128x128")


def parse_tiles(text: str) -> list[tuple[int, int]]:
    """``"128x128,256x256"`` -> [(128, 128), (256, 256)]: one static function per tile."""
    return _size_list(text, "--tiles", "128x128,256x256")


def shapes_text(shapes: Sequence[tuple[int, int]], enumerated: bool) -> str:
    """``"128x128"`` for one fixed shape, ``"enumerated:64x64,128x128"`` for a set (WxH, ``--shapes`` syntax)."""
    listed = ",".join(format_size(h, w) for h, w in shapes)
    return f"enumerated:{listed}" if enumerated else listed


@dataclass
class CoreMLExportConfig:
    """Everything one export needs (the CLI builds it with :func:`resolve_config`).

    Shapes: ``tiles`` (fixed shapes, one static function each: a multifunction package
    when there are several), else ``shapes`` (enumerated, one flexible function), else
    ``input_size`` (one fixed shape). All sizes are (height, width).
    """

    model: str | None = "esc"      # None: recognised from the weights
    scale: int | None = 4          # None: from the weights (4 for random weights)
    weights: str | None = None
    input_size: tuple[int, int] | None = (128, 128)
    shapes: list[tuple[int, int]] | None = None  # enumerated shapes; overrides input_size
    tiles: list[tuple[int, int]] | None = None   # one function per tile; overrides both
    precision: str = "fp16"
    target: str = "iOS18"
    image_io: bool = False
    io_dtype: str = "fp32"         # tensor I/O dtype (fp16 I/O needs iOS 16+)
    compress: str | None = None
    bias: str = "table"
    form: str = "compat"
    #: ANE form: bytes of fp16 one intermediate may take (scores, FFN maps chunked to it; the lint refuses above)
    score_budget: int = DEFAULT_BUDGET_BYTES
    #: ANE form contingencies (models.ane.contingency), off by default
    large_kernel_pieces: bool = False
    mean_as_conv: bool = False
    #: fp16 exports: a folder of the user's pictures for the fp16 safety ranges (None: the default set)
    calibration_images: Path | None = None
    output: Path | None = None
    preset: str | None = None

    @property
    def opset(self) -> str:
        return TARGETS[self.target]

    @property
    def declared_shapes(self) -> list[tuple[int, int]]:
        if self.tiles:
            return list(self.tiles)
        return list(self.shapes) if self.shapes else [tuple(self.input_size)]  # type: ignore[list-item]

    @property
    def enumerated(self) -> bool:
        return bool(self.shapes) and not self.tiles

    @property
    def multifunction(self) -> bool:
        return bool(self.tiles) and len(self.tiles) > 1  # type: ignore[arg-type]

    @property
    def ane_target(self) -> bool:
        """Meant for the Neural Engine: the ANE form in fp16 (the exporter then runs the ANE lint)."""
        return self.form == "ane" and self.precision == "fp16"

    @property
    def shape_text(self) -> str:
        """The declared input shape(s) as ``WxH``, ``WxH,WxH`` (tiles) or ``enumerated:WxH,...``."""
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
        if self.form not in FORMS:
            raise CoreMLExportError(f"form must be one of {', '.join(FORMS)}, not {self.form!r}")
        if self.io_dtype not in IO_DTYPES:
            raise CoreMLExportError(f"io dtype must be one of {', '.join(IO_DTYPES)}, not {self.io_dtype!r}")
        if self.io_dtype == "fp16" and (self.image_io or self.opset == "iOS15"):
            raise CoreMLExportError("fp16 tensor I/O needs tensor (not image) I/O and an iOS 16 / macOS 13 or "
                                    "newer target; drop --io-dtype fp16 or --image-io")
        if not self.tiles and not self.shapes and not self.input_size:
            raise CoreMLExportError("give an input size (--input-size WxH), tiles (--tiles) or enumerated shapes (--shapes)")
        if self.multifunction and self.opset not in MULTIFUNCTION_OPSETS:
            raise CoreMLExportError(
                f"{len(self.tiles or [])} tiles need a multifunction package, which needs an iOS 18 / macOS 15 "
                f"target (got {self.target}); give one --input-size, or --shapes enumerated:... for one "
                f"flexible-shape function (--form compat; not Neural Engine clean)")
        if self.form == "ane" and self.enumerated:
            raise CoreMLExportError("the ANE form has fixed shapes only (one function per tile): use --tiles, "
                                    "or --form compat for enumerated shapes")
        if self.form != "ane" and (self.large_kernel_pieces or self.mean_as_conv):
            raise CoreMLExportError("--large-kernel-pieces and --mean-as-conv are ANE-form rewrites: add --form ane "
                                    "(or a --preset)")
        if self.calibration_images is not None and self.precision != "fp16":
            raise CoreMLExportError(f"--calibration-images records ranges for fp16 safety; this export is "
                                    f"{self.precision}: drop the flag or export --precision fp16")


def resolve_config(model: str | None = "esc", scale: int | None = 4, weights: str | None = None, *,
                   preset: str | None = None, input_size: str | tuple[int, int] | None = None,
                   shapes: str | Sequence[tuple[int, int]] | None = None,
                   tiles: str | Sequence[tuple[int, int]] | None = None, paper_size: bool = False,
                   precision: str | None = None, target: str | None = None, image_io: bool | None = None,
                   io_dtype: str = "fp32", compress: str | None = None, bias: str = "table",
                   form: str | None = None, score_budget: int = DEFAULT_BUDGET_BYTES,
                   large_kernel_pieces: bool = False, mean_as_conv: bool = False,
                   calibration_images: str | os.PathLike | None = None,
                   output: str | os.PathLike | None = None) -> CoreMLExportConfig:
    """Apply a preset, then explicit options (which win), and validate the result.

    A preset gives the ANE form, image I/O, fp16 and its app-sized tiles; ``paper_size``
    takes the preset's Table 9 input size instead. Without a preset: the compat form,
    tensor I/O and one 128x128 input.
    """
    base = PRESETS.get(preset) if preset else None
    if preset and base is None:
        raise CoreMLExportError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    given = [name for name, value in (("--input-size", input_size), ("--shapes", shapes), ("--tiles", tiles),
                                      ("--paper-size", paper_size or None)) if value is not None]
    if len(given) > 1:
        raise CoreMLExportError(f"{' and '.join(given)} exclude each other: a package has one fixed input shape, "
                                f"a set of tiles (one function each) or a set of enumerated shapes")
    if paper_size and base is None:
        raise CoreMLExportError("--paper-size takes a preset's Table 9 input size: give --preset iphone or m2")
    size = parse_size(input_size) if isinstance(input_size, str) else (tuple(input_size) if input_size else None)
    shape_list = parse_shapes(shapes) if isinstance(shapes, str) else ([tuple(s) for s in shapes] if shapes else None)
    tile_list = parse_tiles(tiles) if isinstance(tiles, str) else ([tuple(t) for t in tiles] if tiles else None)
    if paper_size:
        size = base.paper_size  # type: ignore[union-attr]
    if size is None and shape_list is None and tile_list is None:
        if base:
            tile_list = list(base.tiles)
        else:
            size = (128, 128)
    if tile_list is not None and len(tile_list) == 1:
        size, tile_list = tile_list[0], None
    cfg = CoreMLExportConfig(
        model=model, scale=scale, weights=weights, input_size=size if not shape_list and not tile_list else None,
        shapes=shape_list, tiles=tile_list, precision=precision or (base.precision if base else "fp16"),
        target=target or (base.target if base else "iOS18"),
        image_io=image_io if image_io is not None else base is not None, io_dtype=io_dtype,
        compress=compress, bias=bias, form=form or ("ane" if base else "compat"), score_budget=score_budget,
        large_kernel_pieces=large_kernel_pieces, mean_as_conv=mean_as_conv,
        calibration_images=Path(calibration_images) if calibration_images else None,
        output=Path(output) if output else None, preset=preset)
    cfg.validate()
    return cfg


def default_output_path(cfg: CoreMLExportConfig) -> Path:
    """``artifacts/<variant>_x<scale>_<shapes>_<target>_<precision>[_ane][_<compress>][_image].mlpackage``."""
    sizes = "-".join(format_size(h, w) for h, w in cfg.declared_shapes)
    shape = f"enum{sizes}" if cfg.enumerated else (f"tiles{sizes}" if cfg.multifunction else sizes)
    parts = [cfg.model or "model", f"x{cfg.scale}", shape, cfg.target, cfg.precision]
    if cfg.form == "ane":
        parts.append("ane")
    if cfg.compress:
        parts.append(cfg.compress)
    if cfg.image_io:
        parts.append("image")
    return Path("artifacts") / ("_".join(parts) + ".mlpackage")
