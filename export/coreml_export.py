"""Export ESC models to Core ML ML programs (``.mlpackage``) and check what was written.

Conversion path (coremltools 9 with torch 2.13; ``torch.jit.trace`` input fails inside
the converter there)::

    torch.export.export(model, (x,)).run_decompositions({})  ->  ct.convert(..., mlprogram)

Choices made here, and why:

* **Attention.** The model runs its window attention through :class:`CoreMLAttention`:
  ``F.scaled_dot_product_attention`` *without* an explicit ``scale`` (ESC's 1/sqrt(16) is
  SDPA's default for head dimension 16). coremltools maps SDPA to the fused iOS 18 op
  ``scaled_dot_product_attention`` only when no explicit scale is given; for iOS 16/17
  targets (and for iOS 18 with a scale) it decomposes SDPA into matmul, add, softmax,
  matmul itself, so the same graph serves every target.
* **Relative-position bias.** By default (``bias="table"``) the dense (1, heads, w^2, w^2)
  bias is gathered in-graph from the small (heads, (2w-1)^2) table with two gathers over
  32x32 Toeplitz index tables, and coremltools' constant folding is told not to fold
  tensors above 100k elements (``const_elimination``'s ``skip_const_by_size``): otherwise
  it folds the gather into a 16 MB constant per block (ESC: +80 MB fp32). ``bias="dense"``
  stores the precomputed dense bias instead (bigger package, no gathers at run time).
* **Dynamic 3x3 kernels.** ESC's per-image 3x3 kernels are written in the model as nine
  shifted multiply-adds (~45 MIL ops per ConvAttn). During the trace they are replaced by
  :func:`models.layers.dynamic_depthwise3x3_conv` (a fixed one-hot depthwise conv, a multiply and a
  sum: the same arithmetic): ESC's program drops from ~2100 to ~710 ops, the package's
  ``model.mlmodel`` from 1 MB to 0.45 MB, and conversion takes half the time.
* **Fixed shapes vs enumerated shapes.** A fixed-shape export traces one input size (any
  size: the model reflect-pads to the window internally). Enumerated shapes need a
  shape-generic graph: ``torch.export`` with dynamic height/width in multiples of the
  attention window (the window padding would otherwise be traced as a constant), so
  enumerated sizes must be multiples of the window (32).
* **Image I/O** (``image_io=True``): ``ct.ImageType`` input with ``scale=1/255`` (Core ML
  feeds 0..255 pixels, the program scales them), and an image output. Core ML image
  outputs take no scale, so the model is wrapped in :class:`ImageOutput`, which multiplies
  by 255 and clamps to [0, 255] before conversion.
* **Compression** (coremltools.optimize.coreml configs, run as one extra pass at the end of
  the conversion pipeline so the bias option above still holds): ``palettize8`` /
  ``palettize4`` (k-means look-up tables, per tensor; at 4 bits on iOS 18+ one table per
  16 output channels; the k-means is our own 1-D weighted Lloyd, :class:`KMeansLUT`, so no
  scikit-learn is needed) or ``int8`` (per-channel symmetric linear). Only convolution
  weights of more than 512 elements are compressed: the attention bias tables stay exact.
* **torch 2.13 / coremltools 9 mismatches** (:func:`_patch_graph_for_coremltools`):
  ``aten.alias`` nodes are dropped, and ``aten.zeros/ones(dtype=int64)`` become
  ``aten.full`` (coremltools ignores a keyword dtype and would make the reflect-padding
  index math float). Per-pass whole-program re-validation is skipped during conversion
  (:func:`_validate_once_per_pass_group`; the scope-checking validations still run).

After conversion the package is read back (``runtimes.coreml_interpreter``) and checked:
op histogram, the largest tensor rank (Core ML allows 5; larger fails the export), every
op available in the chosen target's opset (coremltools' MIL op registry), and every
reflect-mode ``pad`` legal (pad < size) at each declared input shape. A failing package is
never written: the package is saved into a temporary directory and renamed into place
only after the checks pass.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import platform
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.common import atomic_output, human_size, path_size, resolve_weights_arg, toolkit_version
from models.attention.backends import WindowedBackend
from models.errors import ESCError

__all__ = [
    "COMPRESSIONS", "PARITY_ATOL", "PRESETS", "TARGETS", "CoreMLAttention", "CoreMLExportConfig", "CoreMLExportError",
    "ExportResult", "ImageOutput", "KMeansLUT", "PackageCheckError", "PackageReport", "Preset",
    "check_package", "convert_module", "default_output_path", "export_coreml", "inspect_package", "parse_shapes",
    "parse_size",
    "prepare_model", "resolve_config", "verify_package",
]

MAX_RANK = 5
#: Constants above this many elements are not folded by coremltools (see module doc).
CONST_FOLD_LIMIT = 100_000
#: CLI target names -> the MIL opset (iOS name) they share; macOS 13/14/15 = iOS 16/17/18.
TARGETS: dict[str, str] = {
    "iOS16": "iOS16", "iOS17": "iOS17", "iOS18": "iOS18",
    "macOS13": "iOS16", "macOS14": "iOS17", "macOS15": "iOS18",
}
PRECISIONS = ("fp16", "fp32")
COMPRESSIONS = ("palettize4", "palettize8", "int8")
BIAS_MODES = ("table", "dense")
#: Interpreter-vs-PyTorch bounds (max abs error on [0, 1] outputs): fp32 packages match to
#: float rounding (measured 1e-5 .. 2e-5); fp16 packages run in emulated fp16 are bounded
#: like ``validation/parity.py``'s fp16 threshold (measured on Set5 crops: 3e-3 .. 6e-3).
#: Compressed weights change the model itself, so they have no bound here.
PARITY_ATOL = {"fp32": 1e-4, "fp16": 2e-2}
INPUT_NAME = "input"
OUTPUT_NAME = "output"
WEIGHTS_LICENSE = ("MIT (ESC code and official weights, Lee, Yun & Ro, ICCV 2025: "
                   "https://github.com/dslisleedh/ESC)")


class CoreMLExportError(ESCError, ValueError):
    """A user-facing problem with a Core ML export (bad option, unconvertible model)."""


class PackageCheckError(CoreMLExportError):
    """A converted package failed a post-conversion check; it was not written."""


# --------------------------------------------------------------------------------------
# Presets and options
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# Export-side model pieces
# --------------------------------------------------------------------------------------
def _toeplitz_index(window: int, device: torch.device) -> torch.Tensor:
    """(w*w,) flattened ``idx[q, k] = k - q + w - 1``: one axis of the relative offset."""
    r = torch.arange(window, device=device)
    return (r[None, :] - r[:, None] + (window - 1)).reshape(-1)


def table_bias(table: torch.Tensor, window: int) -> torch.Tensor:
    """The dense (1, heads, w^2, w^2) bias gathered from a (heads, (2w-1)^2) table.

    Two small gathers replace one (w^2, w^2) index: rows of the (2w-1, 2w-1) table by the
    vertical offset, then columns by the horizontal one; the result is (heads, qh, kh, qw,
    kw), permuted to (heads, qh, qw, kh, kw) (rank 5). Equals :func:`models.attention.windows.dense_bias`.
    """
    heads = table.shape[0]
    span = 2 * window - 1
    idx = _toeplitz_index(window, table.device)
    grid = table.reshape(heads, span, span)
    rows = grid.index_select(1, idx).reshape(heads, window, window, span)
    full = rows.index_select(3, idx).reshape(heads, window, window, window, window)
    return full.permute(0, 1, 3, 2, 4).reshape(1, heads, window * window, window * window)


class CoreMLAttention(WindowedBackend):
    """Window attention written for coremltools: SDPA with no explicit scale.

    ``bias="table"`` gathers the bias from the table in-graph (:func:`table_bias`);
    ``"dense"`` uses the module's dense bias (the deploy-time cache when present).
    """

    name = "coreml"

    def __init__(self, bias: str = "table") -> None:
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        self.bias = bias

    def core(self, q, k, v, attn):
        if q.shape[-1] != 16:  # SDPA's default scale must be ESC's 1/sqrt(16)
            raise CoreMLExportError(f"ESC attention has head dimension 16, got {q.shape[-1]}")
        if self.bias == "table":
            bias = table_bias(attn.relative_position_bias, attn.window)
        else:
            bias = attn.dense_bias()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))

    def __repr__(self) -> str:
        return f"CoreMLAttention(bias={self.bias!r})"


class ImageOutput(nn.Module):
    """``clamp(model(x) * 255, 0, 255)``: what a Core ML image output needs (no output scale)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self.model(x) * 255.0, 0.0, 255.0)


def prepare_model(model: nn.Module, bias: str = "table") -> nn.Module:
    """Deploy an ESC model for Core ML: folds applied, :class:`CoreMLAttention` in every block."""
    if not hasattr(model, "attention_modules"):
        raise CoreMLExportError(f"{type(model).__name__} is not an ESC model (no attention modules)")
    model.deploy(precompute_bias=bias == "dense")
    model.set_attention(CoreMLAttention(bias))
    return model.eval()


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


# --------------------------------------------------------------------------------------
# torch.export and coremltools
# --------------------------------------------------------------------------------------
def _quiet_coremltools() -> Any:
    """Import coremltools without its import-time noise (untested torch version, no Core ML
    framework proxies on Linux) and with its loggers at ERROR."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import coremltools as ct
        except Exception as exc:
            raise CoreMLExportError(f"Core ML export needs coremltools (pip install coremltools): {exc}") from exc
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct


def export_program(module: nn.Module, example: torch.Tensor, dynamic_multiple: int | None = None,
                   max_size: tuple[int, int] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` + ``run_decompositions({})``, cleaned for coremltools.

    ``dynamic_multiple``: export height and width as symbolic multiples of it (up to
    ``max_size``), for enumerated shapes. ``aten.alias`` nodes (no-op views that torch
    2.13 leaves after decomposition and coremltools 9 does not know) are removed.
    """
    dynamic_shapes = None
    if dynamic_multiple is not None:
        mh = max(1, math.ceil((max_size or example.shape[-2:])[0] / dynamic_multiple))
        mw = max(1, math.ceil((max_size or example.shape[-2:])[1] / dynamic_multiple))
        kh = torch.export.Dim("tiles_h", min=1, max=max(mh, 2))
        kw = torch.export.Dim("tiles_w", min=1, max=max(mw, 2))
        dynamic_shapes = ({2: dynamic_multiple * kh, 3: dynamic_multiple * kw},)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
            ep = ep.run_decompositions({})
    except Exception as exc:
        raise CoreMLExportError(
            f"torch.export could not trace {type(module).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    if _patch_graph_for_coremltools(ep.graph):
        ep.graph_module.recompile()
    return ep


def _patch_graph_for_coremltools(graph: torch.fx.Graph) -> int:
    """Rewrite the nodes coremltools 9 mis-converts from torch 2.13 exports; returns how many.

    * ``aten.alias`` (a no-op view left by ``run_decompositions``; coremltools does not
      know it): removed;
    * ``aten.zeros`` / ``aten.ones`` with a ``dtype`` keyword: coremltools reads the dtype
      only from a positional argument and makes float32 tensors, so integer index math
      built on them (the model's reflect-padding indices) turns float and the ``gather``
      using it is refused. Rewritten as ``aten.full(size, 0 | 1, dtype=...)``, whose dtype
      keyword it honours.
    """
    changed = 0
    fills = {torch.ops.aten.zeros.default: 0, torch.ops.aten.ones.default: 1}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
        elif node.target in fills and node.kwargs.get("dtype") is not None:
            node.args = (node.args[0], fills[node.target])
            node.target = torch.ops.aten.full.default
            changed += 1
    return changed


class KMeansLUT:
    """A coremltools ``lut_function``: 1-D weighted k-means (Lloyd), quantile + uniform start.

    Returns ``(lut, indices)`` for a weight tensor: ``2**nbits`` centroids and one index
    per element. Deterministic and numpy-only (coremltools' own k-means needs scikit-learn).
    """

    def __init__(self, nbits: int, iterations: int = 100) -> None:
        self.nbits = nbits
        self.iterations = iterations

    def __call__(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = 1 << self.nbits
        values, inverse, counts = np.unique(np.asarray(weight, dtype=np.float64).reshape(-1),
                                            return_inverse=True, return_counts=True)
        lut = np.zeros(k, dtype=np.float64)
        if len(values) <= k:
            lut[: len(values)] = values
            return lut.astype(weight.dtype), inverse.reshape(-1).astype(np.uint8)
        # Start from half quantiles (where the mass is) and half a uniform grid over the
        # range (the tails: Lloyd never moves a centroid into an empty tail, and a large
        # kernel's few big taps matter most); ESC's 13x13 kernel at 8 bits: max error
        # 7e-4 instead of 2e-2 with quantiles alone.
        cdf = (np.cumsum(counts) - 0.5 * counts) / counts.sum()
        half = k // 2
        centroids = np.sort(np.concatenate([np.interp((np.arange(half) + 0.5) / half, cdf, values),
                                            np.linspace(values[0], values[-1], k - half)]))
        for _ in range(self.iterations):
            bounds = 0.5 * (centroids[1:] + centroids[:-1])
            assign = np.searchsorted(bounds, values)
            mass = np.bincount(assign, weights=counts, minlength=k)
            total = np.bincount(assign, weights=counts * values, minlength=k)
            updated = np.where(mass > 0, total / np.maximum(mass, 1e-300), centroids)
            updated.sort()
            if np.allclose(updated, centroids, rtol=0, atol=1e-12):
                centroids = updated
                break
            centroids = updated
        bounds = 0.5 * (centroids[1:] + centroids[:-1])
        assign = np.searchsorted(bounds, values)
        return centroids.astype(weight.dtype), assign[inverse.reshape(-1)].astype(np.uint8)


def _pass_pipeline(ct: Any, compress: str | None, opset: str = "iOS18") -> Any:
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.set_options("common::const_elimination", {"skip_const_by_size": str(CONST_FOLD_LIMIT)})
    if compress:
        import coremltools.optimize.coreml as cto

        if compress.startswith("palettize"):
            nbits = int(compress[len("palettize"):])
            # iOS 18 LUTs can be per group of output channels: at 4 bits one table per 16
            # channels keeps the large kernel's taps (older opsets: one table per tensor).
            grouped = nbits <= 4 and opset >= "iOS18"
            op_config = cto.OpPalettizerConfig(
                mode="custom", lut_function=KMeansLUT(nbits), weight_threshold=512,
                granularity="per_grouped_channel" if grouped else "per_tensor", group_size=16 if grouped else 0)
            pass_name = "compression::palettize_weights"
        else:
            op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                                    granularity="per_channel", weight_threshold=512)
            pass_name = "compression::linear_quantize_weights"
        pipeline.append_pass(pass_name)
        pipeline.append_pass("common::dead_code_elimination")
        # Convolution weights only: the attention bias tables stay exact.
        pipeline.set_options(pass_name, {"config": cto.OptimizationConfig(op_type_configs={"conv": op_config})})
    return pipeline


@contextlib.contextmanager
def _validate_once_per_pass_group() -> Iterator[None]:
    """Skip coremltools' whole-program re-validation after every one of its ~110 passes.

    ``Program.validate`` walks every op after each pass; for ESC's ~10k ops that is about
    half of the conversion time. Validations that also check scopes (after the frontend,
    after each dead-code elimination, and in the backend before serialisation) still run,
    so an invalid program is still refused before it is written.
    """
    try:
        from coremltools.converters.mil.mil.program import Program
    except ImportError:  # pragma: no cover
        yield
        return
    original = Program.validate

    def validate(self: Any, check_essential_scope: bool = False) -> None:
        if check_essential_scope:
            original(self, check_essential_scope=check_essential_scope)

    Program.validate = validate  # type: ignore[method-assign]
    try:
        yield
    finally:
        Program.validate = original  # type: ignore[method-assign]


def convert_program(ep: torch.export.ExportedProgram, cfg: CoreMLExportConfig) -> Any:
    """``ct.convert`` an exported program into an (unsaved) ML program model."""
    ct = _quiet_coremltools()
    shapes = [(1, 3, h, w) for h, w in cfg.declared_shapes]
    shape: Any = shapes[0]
    if cfg.enumerated:
        shape = ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
    if cfg.image_io:
        inputs = [ct.ImageType(name=INPUT_NAME, shape=shape, scale=1.0 / 255.0, color_layout=ct.colorlayout.RGB)]
        outputs = [ct.ImageType(name=OUTPUT_NAME, color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=np.float32)]
        outputs = [ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)]
    target = getattr(ct.target, cfg.target)
    precision = ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32
    try:
        with _validate_once_per_pass_group(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ct.convert(ep, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=target, compute_precision=precision,
                              pass_pipeline=_pass_pipeline(ct, cfg.compress, cfg.opset), skip_model_load=True)
    except CoreMLExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        raise CoreMLExportError(f"coremltools could not convert the model for {cfg.target} "
                                f"({type(exc).__name__}: {first})") from exc


# --------------------------------------------------------------------------------------
# Post-conversion checks
# --------------------------------------------------------------------------------------
@dataclass
class PackageReport:
    """What :func:`inspect_package` found in a saved package."""

    path: Path
    size_bytes: int
    opset: str
    target: str
    histogram: Counter
    max_rank: int
    max_rank_vars: list[str]
    unavailable_ops: list[str]
    reflect_pads: int
    reflect_pad_problems: list[str]
    opset_problem: str | None
    inputs: list[str]
    outputs: list[str]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.max_rank > MAX_RANK:
            found.append(f"tensors of rank {self.max_rank} (Core ML allows at most {MAX_RANK}): "
                         f"{', '.join(self.max_rank_vars[:5])}")
        if self.unavailable_ops:
            found.append(f"ops not available on {self.target}: {', '.join(self.unavailable_ops)}")
        found += self.reflect_pad_problems
        if self.opset_problem:
            found.append(self.opset_problem)
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def histogram_text(self, limit: int | None = None) -> str:
        items = self.histogram.most_common(limit)
        return ", ".join(f"{name} {count}" for name, count in items)


def _registry_ops() -> dict[str, Any]:
    _quiet_coremltools()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    return SSAOpRegistry.core_ops


def ops_unavailable_on(op_types: Sequence[str], target: str) -> list[str]:
    """Op types that the MIL opset of ``target`` (an iOS/macOS name) does not define."""
    ct = _quiet_coremltools()
    opset = TARGETS.get(target, target)
    value = getattr(ct.target, opset).value
    registry = _registry_ops()
    return sorted(t for t in set(op_types) if t not in registry or value not in registry[t])


def inspect_package(path: str | os.PathLike, target: str | None = None,
                    shapes: Sequence[tuple[int, int]] | None = None) -> PackageReport:
    """Read a saved package back and measure what the checks need.

    ``target``: the deployment target to check op availability against (default: the
    program's own opset). ``shapes``: the declared (H, W) input shapes, used to evaluate
    reflect pads whose sizes are symbolic in the program (enumerated shapes).
    """
    from runtimes.coreml_interpreter import COMPILE_TIME_OPS, load_program

    program = load_program(path)
    target = target or program.target
    consumers = program.consumers()
    max_rank, max_vars = 0, []
    vars_to_check = list(program.inputs)
    for op in program.ops:
        if op.type == "const" and all(u.type in COMPILE_TIME_OPS for u in consumers.get(op.outputs[0].name, [])) \
                and consumers.get(op.outputs[0].name):
            continue  # compile-time payloads (LUTs, packed indices) are not run-time tensors
        vars_to_check += op.outputs
    for var in vars_to_check:
        rank = var.rank or 0
        if rank > max_rank:
            max_rank, max_vars = rank, [var.name]
        elif rank == max_rank:
            max_vars.append(var.name)
    unavailable = ops_unavailable_on([op.type for op in program.ops], target)
    opset_problem = None
    order = ["iOS15", "iOS16", "iOS17", "iOS18", "iOS26"]
    wanted = TARGETS.get(target, target)
    if program.target in order and wanted in order and order.index(program.target) > order.index(wanted):
        opset_problem = (f"the program's opset {program.opset} ({program.target}) is newer than the {target} "
                         f"opset ({wanted}): {target} devices cannot load it")

    # Reflect pads: pad < size on every padded axis, at every declared input shape.
    pads = [op for op in program.ops if op.type == "pad" and _pad_mode(program, op) == "reflect"]
    problems: list[str] = []
    var_types = program.var_types()
    symbolic = []
    for op in pads:
        amounts = _pad_amounts(program, op)
        x_type = var_types.get(op.inputs["x"][0].name) if op.inputs["x"][0].name else None
        if amounts is None or x_type is None or x_type.shape is None or None in x_type.shape:
            symbolic.append(op)
            continue
        problems += _reflect_problems(op.name, x_type.shape, amounts, None)
    if symbolic:
        problems += _reflect_problems_by_running(program, symbolic, shapes)
    return PackageReport(
        path=Path(path), size_bytes=path_size(path), opset=program.opset, target=target,
        histogram=program.histogram(), max_rank=max_rank, max_rank_vars=max_vars, unavailable_ops=unavailable,
        reflect_pads=len(pads), reflect_pad_problems=problems, opset_problem=opset_problem,
        inputs=[v.name for v in program.inputs],
        outputs=list(program.outputs), metadata=program.metadata)


def _const_value(program: Any, op: Any, key: str) -> Any:
    refs = op.inputs.get(key)
    if not refs:
        return None
    ref = refs[0]
    if ref.name is None:
        return ref.value
    for producer in program.ops:
        if producer.type == "const" and producer.outputs[0].name == ref.name:
            return producer.attributes.get("val")
    return None


def _pad_mode(program: Any, op: Any) -> str:
    mode = _const_value(program, op, "mode")
    if mode is None:
        return "constant"
    return str(np.asarray(mode).reshape(-1)[0]) if isinstance(mode, np.ndarray) else str(mode)


def _pad_amounts(program: Any, op: Any) -> list[int] | None:
    pad = _const_value(program, op, "pad")
    return None if pad is None else [int(v) for v in np.asarray(pad).reshape(-1)]


def _reflect_problems(name: str, shape: Sequence[int], amounts: Sequence[int], where: str | None) -> list[str]:
    n = len(amounts) // 2
    found = []
    for i in range(n):
        axis = len(shape) - n + i
        before, after = amounts[2 * i], amounts[2 * i + 1]
        if (before or after) and max(before, after) >= shape[axis]:
            at = f" for input {where}" if where else ""
            found.append(f"reflect pad '{name}'{at} pads {max(before, after)} on an axis of size {shape[axis]} "
                         f"(Core ML needs pad < size)")
    return found


def _reflect_problems_by_running(program: Any, pads: list[Any], shapes: Sequence[tuple[int, int]] | None) -> list[str]:
    """Evaluate symbolic reflect pads by running the program at each declared shape."""
    from runtimes.coreml_interpreter import Interpreter

    if not shapes:
        return [f"reflect pad '{op.name}' has symbolic sizes and no declared shapes were given to check it"
                for op in pads]
    watched = {op.name for op in pads}
    problems: list[str] = []
    interp = Interpreter(program, precision="fp32")
    for h, w in shapes:
        def trace(op: Any, outputs: list[Any], env: dict[str, Any], h=h, w=w) -> None:
            if op.name in watched:
                x_ref, pad_ref = op.inputs["x"][0], op.inputs["pad"][0]
                x = env[x_ref.name] if x_ref.name else x_ref.value
                pad = env[pad_ref.name] if pad_ref.name else pad_ref.value
                amounts = [int(v) for v in np.asarray(pad).reshape(-1)]
                problems.extend(_reflect_problems(op.name, np.asarray(x).shape, amounts, f"{h}x{w}"))
        try:
            interp.run({program.inputs[0].name: np.zeros((1, 3, h, w), np.float32)}, trace=trace)
        except Exception as exc:  # the interpreter's own reflect check raises too
            problems.append(f"running the program at {h}x{w} to check its reflect pads failed: {exc}")
    return problems


def check_package(report: PackageReport) -> None:
    """Raise :class:`PackageCheckError` listing every failed check."""
    if not report.ok:
        raise PackageCheckError(
            f"the converted package fails {len(report.problems)} check(s): " + "; ".join(report.problems))


# --------------------------------------------------------------------------------------
# Parity through the interpreter
# --------------------------------------------------------------------------------------
@dataclass
class ParityResult:
    max_abs: float
    mean_abs: float
    psnr: float
    precision: str
    shape: tuple[int, ...]

    def passed(self, atol: float) -> bool:
        return bool(self.max_abs <= atol)


def verify_package(path: str | os.PathLike, reference: nn.Module, x: torch.Tensor, precision: str = "auto",
                   image_io: bool | None = None) -> ParityResult:
    """Run the package in the numpy interpreter and compare with ``reference(x)``.

    ``x`` is (1, 3, h, w) in [0, 1]; image packages are fed 0..255 and their output is
    divided by 255 (and compared with the clamped reference, as the image output clamps).
    """
    from runtimes.coreml_interpreter import Interpreter

    interp = Interpreter(path, precision=precision)
    if image_io is None:
        image_io = interp.program.description.input[0].type.WhichOneof("Type") == "imageType"
    feed = x.detach().cpu().numpy().astype(np.float32)
    out = interp.predict(feed * 255.0 if image_io else feed)
    if image_io:
        out = out / 255.0
    with torch.no_grad():
        ref = reference(x).float().cpu().numpy()
    if image_io:
        ref = np.clip(ref, 0.0, 1.0)
    if out.shape != ref.shape:
        raise CoreMLExportError(f"the package returns {out.shape}, the reference {ref.shape}")
    err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    mse = float(np.mean((np.clip(out, 0, 1) - np.clip(ref, 0, 1)) ** 2))
    psnr = float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)
    return ParityResult(float(err.max()), float(err.mean()), psnr, precision, tuple(out.shape))


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    config: CoreMLExportConfig
    report: PackageReport
    metadata: dict[str, str]
    attention: str
    model: nn.Module | None = field(default=None, repr=False)  # the PyTorch model that was converted

    def summary_rows(self) -> list[tuple[str, str]]:
        cfg, rep = self.config, self.report
        shapes = ", ".join(f"{h}x{w}" for h, w in cfg.declared_shapes)
        io_kind = "RGB image, 0..255 (scaled by 1/255 in the program)" if cfg.image_io else "float32 RGB in [0, 1]"
        out_kind = "RGB image (clamped)" if cfg.image_io else "float32 RGB, unclamped"
        sha = self.metadata.get("esc.weights_sha256")
        weights = f"weights sha256 {sha[:12]}" if sha not in (None, "random") else "random weights"
        rows = [
            ("artifact", str(self.path)),
            ("size", human_size(rep.size_bytes)),
            ("model", f"{self.metadata.get('esc.variant', '?')} x{self.metadata.get('esc.scale', '?')} ({weights})"),
            ("input", f"'{INPUT_NAME}' 1x3x({'enumerated ' if cfg.enumerated else ''}{shapes}) {io_kind}"),
            ("output", f"'{OUTPUT_NAME}' x{cfg.scale} {out_kind}"),
            ("target", f"{cfg.target} (MIL opset {rep.opset}, ML program)"
                       + (f", preset {cfg.preset}: {PRESETS[cfg.preset].device}" if cfg.preset else "")),
            ("precision", cfg.precision + (f", weights {cfg.compress}" if cfg.compress else "")),
            ("attention", self.attention),
            ("ops", f"{sum(rep.histogram.values())}: {rep.histogram_text(12)}"),
            ("checks", f"max rank {rep.max_rank} <= {MAX_RANK}; all {len(rep.histogram)} op types in the "
                       f"{cfg.target} opset; {rep.reflect_pads} reflect pad(s), all legal"),
            ("use (macOS)", f"ct.models.MLModel('{self.path}').predict({{'{INPUT_NAME}': x}})['{OUTPUT_NAME}']"),
            ("use (toolkit)", f"runtimes.base.load('{self.path}') (Core ML on macOS, numpy interpreter elsewhere)"),
        ]
        return rows


def _attention_form(report: PackageReport) -> str:
    if report.histogram.get("scaled_dot_product_attention"):
        return f"fused scaled_dot_product_attention x{report.histogram['scaled_dot_product_attention']}"
    return f"decomposed: matmul x{report.histogram.get('matmul', 0)} + softmax x{report.histogram.get('softmax', 0)}"


def _metadata(cfg: CoreMLExportConfig, model: nn.Module | None, sha: str | None) -> dict[str, str]:
    desc = getattr(model, "descriptor", None)
    tile = ("enumerated:" + ",".join(f"{h}x{w}" for h, w in cfg.declared_shapes)) if cfg.enumerated \
        else f"{cfg.input_size[0]}x{cfg.input_size[1]}"  # type: ignore[index]
    meta = {
        "esc.variant": str(getattr(desc, "variant", cfg.model)),
        "esc.arch": str(getattr(desc, "arch", "")),
        "esc.scale": str(cfg.scale),
        "esc.window_size": str(getattr(desc, "window_size", "")),
        "esc.input_multiple": str(getattr(desc, "input_multiple", "")),
        "esc.tile": tile,
        "esc.shape_mode": "enumerated" if cfg.enumerated else "fixed",
        "esc.precision": cfg.precision,
        "esc.compression": cfg.compress or "none",
        "esc.target": cfg.target,
        "esc.attention_bias": cfg.bias,
        "esc.image_io": "true" if cfg.image_io else "false",
        "esc.weights_sha256": sha or "random",
        "esc.toolkit_version": toolkit_version(),
    }
    if cfg.preset:
        meta["esc.preset"] = cfg.preset
    return meta


def _apply_metadata(ml: Any, cfg: CoreMLExportConfig, meta: dict[str, str]) -> None:
    variant = meta["esc.variant"]
    ml.short_description = (
        f"ESC {variant} x{cfg.scale} image super-resolution (ICCV 2025). Input: RGB "
        f"{'image' if cfg.image_io else 'float32 tensor in [0, 1]'}, "
        f"{'enumerated shapes ' + meta['esc.tile'][len('enumerated:'):] if cfg.enumerated else meta['esc.tile']}; "
        f"output {cfg.scale}x larger.")
    ml.author = ("ESC: Dongheon Lee, Seokju Yun, Youngmin Ro (weights: official ESC release)"
                 if meta["esc.weights_sha256"] != "random" else "random weights (esc-deploy test export)")
    ml.license = WEIGHTS_LICENSE if meta["esc.weights_sha256"] != "random" else "no weights (random initialisation)"
    ml.version = meta["esc.toolkit_version"]
    ml.input_description[INPUT_NAME] = (
        "RGB image; Core ML scales its 0..255 pixels by 1/255" if cfg.image_io
        else "RGB, NCHW float32 in [0, 1], batch 1")
    ml.output_description[OUTPUT_NAME] = (
        "RGB image, upscaled" if cfg.image_io else "RGB, NCHW float32, upscaled; not clamped (clamp to [0, 1])")
    ml.user_defined_metadata.update(meta)


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


def convert_module(module: nn.Module, cfg: CoreMLExportConfig, output: str | os.PathLike | None = None,
                   model_for_metadata: nn.Module | None = None, weights_sha256: str | None = None,
                   check: bool = True, compact_kernels: bool = True) -> ExportResult:
    """Convert any ``(1,3,h,w) -> (1,3,sh,sw)`` module with the export code path and save it.

    This is what :func:`export_coreml` uses after building the model; tests feed it wrapped
    or deliberately broken modules. The package is checked (:func:`inspect_package`)
    before it is moved into place; with ``check=True`` a failing package raises
    :class:`PackageCheckError` and nothing is written. ``compact_kernels``: trace the
    dynamic 3x3 kernels as :func:`models.layers.dynamic_depthwise3x3_conv` (default; False keeps the
    model's nine shifted multiply-adds).
    """
    cfg.validate()
    if cfg.scale is None:
        cfg.scale = getattr(model_for_metadata if model_for_metadata is not None else module, "scale", None)
        if cfg.scale is None:
            raise CoreMLExportError("the upscaling factor is unknown: set CoreMLExportConfig.scale")
    module = module.eval()
    if cfg.image_io:
        module = ImageOutput(module)
    shapes = cfg.declared_shapes
    example = torch.rand(1, 3, *shapes[0], generator=torch.Generator().manual_seed(0))
    dynamic = None
    if cfg.enumerated:
        window = getattr(getattr(model_for_metadata or module, "config", None), "window_size", None) or 32
        bad = [f"{h}x{w}" for h, w in shapes if h % window or w % window]
        if bad:
            raise CoreMLExportError(
                f"enumerated shapes must be multiples of the attention window ({window}): {', '.join(bad)}. "
                f"The window padding is traced into the graph, so one program serves only window multiples; "
                f"export a fixed --input-size for other sizes.")
        dynamic = window
        # Trace at two windows per side: torch.export specialises symbolic sizes that are 1,
        # so an example of one window would pin the graph to that size.
        example = torch.rand(1, 3, 2 * window, 2 * window, generator=torch.Generator().manual_seed(0))
    if compact_kernels:   # the model option of every ConvAttn inside (module may wrap the model)
        for sub in module.modules():
            if hasattr(sub, "set_dynamic_form"):
                sub.set_dynamic_form("conv")
    ep = export_program(module, example, dynamic_multiple=dynamic,
                            max_size=(max(h for h, _ in shapes), max(w for _, w in shapes)))
    ml = convert_program(ep, cfg)
    meta = _metadata(cfg, model_for_metadata, weights_sha256)
    _apply_metadata(ml, cfg, meta)
    out = Path(output or cfg.output or default_output_path(cfg))
    if out.suffix != ".mlpackage":
        raise CoreMLExportError(f"the output must end in .mlpackage (ML programs are packages), got {out}")
    with atomic_output(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ml.save(str(tmp))
        # coremltools writes ExecuTorch's op-to-source mapping (~1 MB for ESC) beside the
        # package data for torch.export sources; Core ML never reads it (it is not in the
        # package manifest), so it is dropped.
        debug_map = Path(tmp) / "executorch_debug_handle_mapping.json"
        if debug_map.is_file():
            debug_map.unlink()
        report = inspect_package(tmp, cfg.target, shapes)
        if check:
            check_package(report)
    report.path = out
    return ExportResult(out, cfg, report, meta, _attention_form(report), model_for_metadata)


def export_coreml(cfg: CoreMLExportConfig) -> ExportResult:
    """Build the ESC model of ``cfg``, convert, check and save it; returns what was written."""
    cfg.validate()
    model, sha = build_model(cfg)
    return convert_module(model, cfg, cfg.output, model_for_metadata=model, weights_sha256=sha)


def is_macos() -> bool:
    return platform.system() == "Darwin"
