"""Export an ESC, ESC-RIB or SST model to ONNX: the library behind ``export/to_onnx.py``.

>>> from models import load_model
>>> from export.onnx_export import export_onnx
>>> report = export_onnx(load_model("ESC_DIV2K_X4.pth"), "esc_x4.onnx")      # opset 18, fp32, dynamic
>>> report.parity_after < 1e-4
True

Pipeline (each step is a function below; :func:`export_onnx` runs them in order):

1. **prepare** (:func:`prepare_for_export`): a copy of the model, deployed with
   ``deploy(precompute_bias=False)`` (the exact folds; the dense 16 MB/block bias cache
   is dropped so the graph gathers the bias from the small table; RIB models drop their
   constant positional factors the same way, and the graph computes them from the tiny
   positional MLP, which runtimes fold once at load), on the CPU in fp32
   (traced after ``.half()`` for fp16: the model keeps LayerNorm statistics in fp32
   through explicit casts, and those casts are in the fp16 graph; see step 4).
2. **trace** (:func:`trace_model`): ``torch.export.export`` with ``Dim("batch")``,
   ``Dim("height")``, ``Dim("width")`` (min 1, no max). The example input is
   ``(2, 3, w + 7, w + 19)`` for window ``w``: both sides need window padding and span two
   windows, and the batch is 2, so no size is specialised to 0/1 or to "no padding".
   The few guards tracing still records (``height != 1``, ``windows != 1``, ``h <=
   padded(h)``) only say which branch of size-generic code was traced; they become
   runtime asserts, which the ONNX exporter drops. The graph is size-generic, which the
   tests check in ONNX Runtime at 1x1, 1xN, one window, exact multiples and batch 3.
   Two export-time helpers, both outside ``models/``:

   - ``aten.remainder.Scalar`` with a *symbolic* divisor (the reflect-padding period
     ``max(2 (size - 1), 1)``) fails in torchlib (``int(SymbolicTensor)``); a custom
     translation emits ``Mod`` on the graph value.
   - the per-image dynamic 3x3 depthwise convolution (``models.layers.
     dynamic_depthwise3x3``: nine shifted slices, multiplies and adds, ~60 graph nodes
     per call, 15 to 50 calls per model) is traced as one depthwise ``Conv`` with fixed one-hot
     weights that gathers the nine taps, a multiply by the per-image kernel and one
     ``ReduceSum`` (same sum, 4 nodes; the one-hot taps are exact copies, only the
     summation order differs, ~1e-7). It halves the node count and made the esc x2 export
     2.7x faster here (102 s -> 38 s: symbolic-shape tracing costs per node); ONNX Runtime
     runs both forms equally fast. ``compact_dynamic_kernel=False`` (CLI
     ``--exact-dynamic-kernel``) exports the original form.
3. **translate** (:func:`translate`): ``torch.onnx.export(program, dynamo=True,
   opset_version=..., optimize=False)``. Opset 23 turns the window attention's
   ``scaled_dot_product_attention`` into one native ``Attention`` node; opset 18 into
   MatMul/Add/Softmax/MatMul. torch's own optimizer is *not* run: its pattern rewriter is
   quadratic in graph size (5+ minutes on this graph). Instead: constant folding
   (onnxscript, outputs up to 1 MiB only, so the relative-position index and the dense
   bias stay computed from the small table instead of 16 MB per block), dead-code
   elimination, CSE, constants lifted to initializers and deduplicated.
   After simplification (step 5; onnxslim would fold each slice of a constant bias into
   the file), the attention layout for ONNX Runtime's CPU (:mod:`export.onnx_attention`,
   ``attention_form``), checked against the same parity gate: by default ``chunked`` below opset 23 (each attention split into
   16 query slices: the same sums, 1/16 of the score memory at a time) and ``native`` at
   opset 23 (one ``Attention`` node per layer, what TensorRT >= 10.14 parses; RIB models'
   nodes have no mask). Measured on esc x4, 128x128 input, ONNX Runtime 1.32 CPU, 2
   threads, peak RSS growth over the first call (``tests/test_onnx_attention_memory.py``
   checks the structure, the parity and one attention's peak):

   =============================  ==========  =============  ======================
   form (``attention_form``)      peak MB     CPU ms/call    wall ms (contended)
   =============================  ==========  =============  ======================
   op18 decomposed (native)       1237        2913           15300
   op18 chunked x16 (default)     293         3740           16829
   op23 Attention (native)        513         2770           14333
   op23 chunked x8                232         2981           15217
   op23 chunked x16               215         3020           15676
   op23 chunked x32               268         3310           7482
   op23 mha (attention_bias)      581         2779           5433
   =============================  ==========  =============  ======================

   One run, 2026-12-02, on a 2-core machine shared with other jobs (load average 15-18),
   so wall times are not comparable between rows; CPU time per call (user + system,
   median of 3) is. Chunking costs 9% (opset 23) to 28% (opset 18, where every slice
   also adds its bias rows) more CPU and removes 58-76% of the peak; ``mha`` holds
   more than ``native``. OpenVINO (same run) fuses the attention itself: op18 native 61 MB,
   1901 ms CPU; op18 chunked x16 53 MB, 2022 ms CPU (+6%).
4. **fp16** (:func:`keep_fp32_math`, :func:`add_fp32_io`): the fp16 graph is the half
   model's own trace, so the model's fp32 LayerNorm statistics (explicit casts) survive;
   the reductions and the softmax it leaves in fp16 (global average pool of the kernel
   estimator, the ``sdpa`` softmax) are wrapped in Casts to fp32, and a native
   ``Attention`` gets ``softmax_precision=FLOAT``. ``fp32_io=True``: ``Cast`` nodes at
   the boundary keep a float32 ``lr``/``sr`` around the fp16 graph.
5. **simplify** (:func:`simplify_graph`): onnxslim (constants above 1 MiB not folded), under a
   parity check: ONNX Runtime CPU runs the graph before and after on a random input of a
   size the trace never saw; if the outputs differ by more than ``SIMPLIFY_ATOL``
   (1e-5 for fp32) the unsimplified graph is kept and the report says why.
   An export whose parity before simplification fails the one threshold table
   (:func:`validation.compare.threshold_for`: fp32 max abs 1e-4; fp16 2e-2 and 50 dB)
   raises :class:`OnnxExportError` and writes nothing.
6. **finish**: IR version 10 (onnx 1.23 writes 14; onnxruntime 1.31 reads at most 13),
   ``esc.*`` metadata (:class:`runtimes.metadata.ArtifactMetadata`),
   ``onnx.checker.check_model(full_check=True)``, then an atomic write (external data
   above 1.9 GB): the temporary file is loaded through ``runtimes.load`` and checked
   against the same table (:func:`export.verify.verify_artifact`) before it takes its name.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Union

import numpy as np
import torch

from models.errors import ESCError
from models.fp16_safety import Fp16UnsafeError

from runtimes.cli_args import SIZE_SYNTAX, parse_size
from runtimes.metadata import ArtifactMetadata, write_onnx_metadata
from validation.compare import ComparisonResult, compare, threshold_for

from .calibration import CalibrationError, Fp16Safety, guard_fp16
from .common import atomic_output, format_summary, human_size
from .onnx_attention import ATTENTION_FORMS, DEFAULT_CHUNKS, rewrite_attention
from .verify import verify_artifact

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from models import ESCBase

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
IR_VERSION = 10
SUPPORTED_OPSETS = (18, 19, 20, 21, 22, 23)
CLI_OPSETS = (18, 23)
NATIVE_ATTENTION_OPSET = 23
EXPORTABLE_ATTENTION = ("sdpa", "naive", "flashbias", "concat")   # flashbias: ESC only; concat: RIB only
PRECISIONS = ("fp32", "fp16")
# Largest change simplification may make to the outputs (ONNX Runtime, before vs after).
# Not a parity threshold (artifact vs PyTorch: validation.compare.THRESHOLDS is the one
# table for those) but a bound on a graph rewrite that must not change the arithmetic,
# hence 10x tighter than the table's fp32 entry: a rewrite bug shows here first.
# fp16: 8 units in the last place at 1.0 (2**-10 each). ONNX Runtime's CPU runs an fp16
# graph by inserting Casts to fp32 around kernels it only has in fp32, so merely removing
# a Reshape moves where values are rounded to fp16: onnxslim's shape-only edits changed
# esc_light's fp16 outputs by 2 ulps (1.95e-3) with identical arithmetic. A real
# simplification bug moves outputs by orders of magnitude more.
SIMPLIFY_ATOL = {"fp32": 1e-5, "fp16": 8 * 2.0 ** -10}
# Constant folding leaves tensors above this many bytes computed in the graph.
FOLD_LIMIT_BYTES = 1 << 20
EXTERNAL_DATA_THRESHOLD = int(1.9 * 2**30)
EXTERNAL_DATA_MIN_TENSOR = 1024        # bytes: smaller tensors stay inside the .onnx
DEFAULT_ARTIFACT_DIR = Path("artifacts")
# fp16 safety of dynamic-shape exports is measured on crops of this size (H, W): a tile.
CALIBRATION_SIZE = (128, 128)
# What an fp16 graph of this exporter computes in fp32 (models.fp16_safety quantity names):
# the sums of means (ReduceMean / GlobalAveragePool run in fp32, keep_fp32_math; LayerNorm
# statistics are fp32 in the model itself). Anything else the safety check flags is refused.
ONNX_FP32_QUANTITIES = ("sum before mean", "sum of squares")

Shape = Union[Literal["dynamic"], tuple[int, int]]
Batch = Union[Literal["dynamic"], int]
Progress = Callable[[str], None]


class OnnxExportError(ESCError, ValueError):
    """An export request that cannot be satisfied (bad option, unexportable back-end...)."""


# -- options ------------------------------------------------------------------------------------
def parse_shape(value: str | tuple[int, int] | list[int] | None) -> Shape:
    """``"dynamic"`` (or None), ``"WIDTHxHEIGHT"`` or a ``(H, W)`` tuple -> ``"dynamic"`` or ``(H, W)``.

    Strings are what a person types, so they follow the project's one size syntax
    (:func:`runtimes.cli_args.parse_size`: width first); tuples are tensor order (height first).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "dynamic"):
        return "dynamic"
    if isinstance(value, str):
        try:
            h, w = parse_size(value)
        except ValueError as exc:
            raise OnnxExportError(f"shape must be 'dynamic' or {SIZE_SYNTAX} (width first): {exc}") from None
    else:
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise OnnxExportError(f"shape must be 'dynamic' or (H, W), got {value!r}") from None
    if h < 1 or w < 1:
        raise OnnxExportError(f"shape sides must be >= 1, got height {h}, width {w}")
    return (h, w)


def parse_batch(value: str | int | None) -> Batch:
    """``"dynamic"`` (or None) or a positive batch size."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "dynamic"):
        return "dynamic"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise OnnxExportError(f"batch must be 'dynamic' or a positive integer, got {value!r}") from None
    if n < 1:
        raise OnnxExportError(f"batch must be >= 1, got {n}")
    return n


def shape_label(shape: Shape) -> str:
    return "dynamic" if shape == "dynamic" else f"{shape[0]}x{shape[1]}"


def default_output_path(model: "ESCBase", opset: int = 18, precision: str = "fp32",
                        directory: Path = DEFAULT_ARTIFACT_DIR) -> Path:
    """``artifacts/<variant>_x<scale>_<attention>_op<opset>_<precision>.onnx``."""
    d = model.descriptor
    return Path(directory) / f"{d.variant}_x{d.scale}_{d.attention}_op{opset}_{precision}.onnx"


def _check_options(opset: int, precision: str) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise OnnxExportError(f"opset {opset} is not supported: use one of {', '.join(map(str, SUPPORTED_OPSETS))} "
                              f"(18: decomposed attention; 23: native ONNX Attention)")
    if precision not in PRECISIONS:
        raise OnnxExportError(f"precision must be fp32 or fp16, got {precision!r}")


def default_attention_form(opset: int) -> str:
    """``chunked`` below opset 23 (ONNX Runtime CPU holds 1/16 of the scores), ``native`` at 23.

    Opset 23 keeps one ``Attention`` node per layer: the form TensorRT parses into its fused
    attention and the ONNX standard's own op; ``attention_form="chunked"`` chunks it too.
    """
    return "native" if opset >= NATIVE_ATTENTION_OPSET else "chunked"


# -- 1. prepare -----------------------------------------------------------------------------------
def prepare_for_export(model: "ESCBase") -> "ESCBase":
    """An fp32 CPU copy of ``model``, deployed without the dense bias cache, in eval mode.

    The caller's model is not modified. ``flex`` and ``fused`` back-ends cannot be
    exported (FlexAttention and the Triton kernel have no ONNX form): an
    :class:`OnnxExportError` says which to use instead. RIB models (ESC-RIB, SST) are
    deployed the same way: their positional factors are dropped with the caches, so the
    graph computes them from the small positional MLP (runtimes fold that subgraph once,
    at load; the file stays the weights' size).
    """
    name = model.attention
    if name not in EXPORTABLE_ATTENTION:
        raise OnnxExportError(
            f"attention={name!r} cannot be exported to ONNX; use one of {', '.join(EXPORTABLE_ATTENTION)} "
            f"(sdpa gives the native Attention op at opset 23; the numbers are the same).")
    # Leave ESC's 16 MB/block dense bias caches out of the copy (deploy would drop them anyway);
    # RIB layers have no such cache.
    memo = {id(cache): None for attn in model.attention_modules()
            if (cache := getattr(attn, "cached_bias", None)) is not None}
    prepared = copy.deepcopy(model, memo)
    prepared = prepared.to("cpu").float()
    prepared.deploy(precompute_bias=False)
    if name == "flashbias":
        with torch.no_grad():   # the low-rank factors are computed once, eagerly, by SVD
            prepared(torch.zeros(1, 3, 8, 8))
    return prepared.eval()


# -- export-time helpers --------------------------------------------------------------------------
def _remainder_scalar(self, other):
    """``aten::remainder.Scalar`` whose divisor may be a symbolic size (a graph value)."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    if isinstance(other, (int, float)):
        other = op.Constant(value=ir.tensor(other, dtype=self.dtype))
    else:
        other = op.CastLike(other, self)
    if self.dtype.is_integer():
        return op.Mod(self, other)   # fmod=0: the sign follows the divisor, as torch.remainder
    return op.Sub(self, op.Mul(op.Floor(op.Div(self, other)), other))


def custom_translation_table() -> dict:
    return {torch.ops.aten.remainder.Scalar: _remainder_scalar}


@contextlib.contextmanager
def _export_context() -> Iterator[None]:
    """Quiet torch's export chatter while tracing."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export",
                                               "torch.fx.experimental.symbolic_shapes", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _backed_size_oblivious() -> Iterator[None]:
    """What torch.onnx's own capture uses, so sizes 0/1 are not special-cased."""
    try:
        patch = torch.fx.experimental._config.patch(backed_size_oblivious=True)
    except (AttributeError, KeyError):  # pragma: no cover - other torch versions
        patch = contextlib.nullcontext()
    with patch:
        yield


# -- 2. trace --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trace:
    """A ``torch.export`` program of a prepared model, reusable for several opsets."""

    program: torch.export.ExportedProgram
    reference: "ESCBase"          # the prepared fp32 model (parity reference)
    precision: str
    shape: Shape
    batch: Batch
    example_shape: tuple[int, int, int, int]
    compact_dynamic_kernel: bool
    seconds: float
    fp16_safety: Fp16Safety | None = None   # fp16 traces: what the safety check on pictures found

    def matches(self, precision: str, shape: Shape, batch: Batch) -> bool:
        return (self.precision, self.shape, self.batch) == (precision, shape, batch)


def example_size(window: int) -> tuple[int, int]:
    """Trace size for dynamic shapes: both sides padded, two windows each."""
    return window + 7, window + 19


def probe_size(window: int) -> tuple[int, int]:
    """Parity-check size no dynamic trace sees: one window tall, two wide, other paddings."""
    return max(window - 5, 1), window + 13


def fp16_guard(reference: "ESCBase", shape: Shape, calibration_images: str | Path | None,
               progress: Progress | None = None) -> tuple["ESCBase", Fp16Safety]:
    """The fp16 copy's fp32 source, made fp16-safe on pictures (:func:`export.calibration.guard_fp16`).

    Measured at the fixed input size, else at ``CALIBRATION_SIZE`` (per-pixel values do not
    depend on the size: convolutions and windows are local, and the global means whose sums
    grow with the area run in fp32 here, :func:`keep_fp32_math`). Refuses, naming the layer,
    a value the fp16 graph would hold that passes ``65504 / 2`` after the exact LayerNorm
    rescaling.
    """
    size = CALIBRATION_SIZE if shape == "dynamic" else shape
    if progress:
        progress(f"checking fp16 safety on calibration pictures at {size[1]}x{size[0]}")
    try:
        return guard_fp16(reference, calibration_images, size, ONNX_FP32_QUANTITIES)
    except CalibrationError as exc:
        raise OnnxExportError(str(exc)) from None
    except Fp16UnsafeError as exc:
        raise OnnxExportError(f"fp16 safety: {exc} Export with --precision fp32, or check the pictures "
                              f"(--calibration-images DIR: the pictures your app will upscale)") from None


def trace_model(model: "ESCBase", precision: str = "fp32", shape: Shape | str = "dynamic",
                batch: Batch | str | int = "dynamic", compact_dynamic_kernel: bool = True,
                progress: Progress | None = None, calibration_images: str | Path | None = None) -> Trace:
    """``torch.export`` the prepared model (see the module docstring for the choices).

    fp16 traces are of a copy made fp16-safe first (:func:`fp16_guard`, on
    ``calibration_images`` or the default pictures); ``trace.fp16_safety`` says what it found.
    """
    if precision not in PRECISIONS:
        raise OnnxExportError(f"precision must be fp32 or fp16, got {precision!r}")
    shape, batch = parse_shape(shape), parse_batch(batch)
    reference = prepare_for_export(model)
    # The traced model is a copy of the reference: its precision and kernel form change,
    # while the reference stays the exact fp32 model the parity checks compare against.
    safety = None
    if precision == "fp16":
        traced, safety = fp16_guard(reference, shape, calibration_images, progress)
        traced = traced.half()
    else:
        traced = copy.deepcopy(reference) if compact_dynamic_kernel else reference
    dtype = torch.float16 if precision == "fp16" else torch.float32
    window = reference.config.window_size
    h, w = example_size(window) if shape == "dynamic" else shape
    n = 2 if batch == "dynamic" else batch
    example = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    dims: dict[int, torch.export.Dim] = {}
    if batch == "dynamic":
        dims[0] = torch.export.Dim("batch", min=1)
    if shape == "dynamic":
        dims[2] = torch.export.Dim("height", min=1)
        dims[3] = torch.export.Dim("width", min=1)
    if progress:
        progress(f"tracing with torch.export ({'x'.join(_dim_words(shape, batch))}, {precision})")
    start = time.perf_counter()
    if compact_dynamic_kernel:
        traced.set_dynamic_kernel_form("conv")
    with _export_context(), _backed_size_oblivious():
        try:
            program = torch.export.export(traced, (example,), dynamic_shapes=(dims,) if dims else None,
                                          strict=False, prefer_deferred_runtime_asserts_over_guards=True)
        except Exception as exc:   # a trace failure is a toolkit bug, but say where it happened
            raise RuntimeError(f"torch.export failed on {reference.descriptor.variant} "
                               f"({type(exc).__name__}): {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return Trace(program, reference, precision, shape, batch, tuple(example.shape), compact_dynamic_kernel,
                 time.perf_counter() - start, safety)


def _dim_words(shape: Shape, batch: Batch) -> list[str]:
    b = "batch" if batch == "dynamic" else str(batch)
    hw = ["height", "width"] if shape == "dynamic" else [str(shape[0]), str(shape[1])]
    return [b, "3", *hw]


# -- 3. translate ------------------------------------------------------------------------------------

def clean_graph(model) -> "onnx.ModelProto":
    """Inline, fold constants (below :data:`FOLD_LIMIT_BYTES`), drop dead code and duplicates.

    Replaces torch's own graph optimiser, whose pattern rewriter took minutes on ESC; the
    fold limit keeps the 16 MB/block dense bias out of the file.
    """
    import onnx_ir as ir
    import onnxscript.optimizer as ooptimizer
    from onnx_ir.passes import common as common_passes

    ir.passes.Sequential(common_passes.InlinePass(), common_passes.RemoveUnusedNodesPass())(model)
    ooptimizer.fold_constants_ir(model, onnx_shape_inference=True, output_size_limit=FOLD_LIMIT_BYTES // 4 - 1)
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    )(model)
    return ir.serde.serialize_model(model)

def translate(trace: Trace, opset: int = 18) -> "onnx.ModelProto":
    """ONNX for ``trace`` at ``opset``: translated, cleaned (folding <= 1 MiB, DCE, CSE)."""

    _check_options(opset, trace.precision)
    with _export_context(), _backed_size_oblivious():
        program = torch.onnx.export(
            trace.program, (), dynamo=True, opset_version=opset, optimize=False, verify=False, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], custom_translation_table=custom_translation_table())
        proto = clean_graph(program.model)
    proto.ir_version = IR_VERSION
    _strip_node_metadata(proto)
    name_dims(proto, trace.reference.scale)
    return proto


def _strip_node_metadata(proto: "onnx.ModelProto") -> None:
    """Drop per-node stack traces and module paths (smaller, machine-independent files)."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
    del proto.metadata_props[:]


def name_dims(proto: "onnx.ModelProto", scale: int | None) -> None:
    """Give the symbolic dims readable names: batch, height, width, <s>*height, <s>*width.

    Shared with the plugin-form export so both artifacts show users the same dim names.
    """
    import re

    mapping: dict[str, str] = {}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for axis, name in ((0, "batch"), (2, "height"), (3, "width")):
        if axis < len(dims) and dims[axis].dim_param:
            mapping[dims[axis].dim_param] = name
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(mapping, key=len, reverse=True))) + r")\b")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: mapping[m.group(1)], d.dim_param)
    out = proto.graph.output[0].type.tensor_type.shape.dim
    for axis, name in ((2, "height"), (3, "width")):
        if scale and axis < len(out) and out[axis].dim_param:
            out[axis].dim_param = f"{scale}*{name}"


# -- 4. fp16: reductions and softmax in fp32, optional fp32 I/O ---------------------------------------
FP32_MATH_OPS = ("ReduceMean", "ReduceSum", "Softmax", "GlobalAveragePool")


def keep_fp32_math(proto: "onnx.ModelProto") -> int:
    """In an fp16 graph, run reductions and softmax in fp32 (in place); returns how many.

    The model already computes LayerNorm statistics in fp32 (its casts are in the graph).
    What it leaves in fp16: the kernel estimator's global average pool (a mean over every
    pixel) and, with ``sdpa``, the attention softmax. Those nodes get a Cast to fp32 before
    and back to fp16 after; a native ``Attention`` node gets ``softmax_precision=FLOAT``.
    """
    import onnx
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    changed = 0
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Attention" and types.get(node.input[0]) == TensorProto.FLOAT16:
            attrs = [a for a in node.attribute if a.name != "softmax_precision"]
            del node.attribute[:]
            node.attribute.extend([*attrs, helper.make_attribute("softmax_precision", TensorProto.FLOAT)])
            changed += 1
        elif node.op_type in FP32_MATH_OPS and types.get(node.input[0]) == TensorProto.FLOAT16:
            src, dst = node.input[0], node.output[0]
            up, down = f"{dst}__fp32_in", f"{dst}__fp32_out"
            nodes.append(helper.make_node("Cast", [src], [up], name=f"{dst}__cast_in", to=TensorProto.FLOAT))
            node.input[0], node.output[0] = up, down
            nodes.append(node)
            nodes.append(helper.make_node("Cast", [down], [dst], name=f"{dst}__cast_out", to=TensorProto.FLOAT16))
            changed += 1
            continue
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return changed


def add_fp32_io(proto: "onnx.ModelProto") -> None:
    """Make ``lr``/``sr`` float32 with a Cast on each side of the fp16 graph (in place)."""
    from onnx import TensorProto, helper

    graph = proto.graph
    inner_in, inner_out = f"{INPUT_NAME}_fp16", f"{OUTPUT_NAME}_fp16"
    for node in graph.node:
        node.input[:] = [inner_in if n == INPUT_NAME else n for n in node.input]
        node.output[:] = [inner_out if n == OUTPUT_NAME else n for n in node.output]
    cast_in = helper.make_node("Cast", [INPUT_NAME], [inner_in], name="cast_lr_to_fp16", to=TensorProto.FLOAT16)
    cast_out = helper.make_node("Cast", [inner_out], [OUTPUT_NAME], name="cast_sr_to_fp32", to=TensorProto.FLOAT)
    nodes = [cast_in, *graph.node, cast_out]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT


# -- parity --------------------------------------------------------------------------------------------
def run_onnx(model, x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Run the graph's ``lr`` -> ``sr`` on ``x`` (cast to the graph's input dtype); float32 out.

    ``model``: a session, or anything :func:`runtimes.onnx_runner.make_session` takes.
    """
    from runtimes.onnx_runner import make_session  # onnxruntime only when a graph is run

    session = model if hasattr(model, "run") else make_session(model)
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return session.run(None, {inp.name: array.astype(dtype)})[0].astype(np.float32)


def _probe(trace: Trace) -> torch.Tensor:
    window = trace.reference.config.window_size
    h, w = probe_size(window) if trace.shape == "dynamic" else trace.shape
    n = 1 if trace.batch == "dynamic" else trace.batch
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1234))


# -- 5. simplify -----------------------------------------------------------------------------------------
def simplify_graph(proto: "onnx.ModelProto") -> "onnx.ModelProto":
    """onnxslim with constant folding capped at ``FOLD_LIMIT_BYTES``; a new proto."""
    import onnxslim

    slim = onnxslim.slim(copy.deepcopy(proto), size_threshold=FOLD_LIMIT_BYTES - 1)
    if slim is None:   # pragma: no cover - onnxslim returns None only when its own check fails
        raise RuntimeError("onnxslim returned no model")
    slim.ir_version = IR_VERSION
    return slim


@dataclasses.dataclass
class SimplifyResult:
    model: "onnx.ModelProto"            # the simplified graph, or the input when refused
    simplified: bool
    note: str
    delta: float | None                 # max |after - before| in ONNX Runtime
    after: np.ndarray | None            # outputs of the simplified graph on the probe
    removed_ops: dict[str, int]
    added_ops: dict[str, int]


def simplify_checked(proto: "onnx.ModelProto", probe: torch.Tensor, before: np.ndarray,
                     precision: str = "fp32") -> SimplifyResult:
    """:func:`simplify_graph` under a parity check: refused if the outputs move > ``SIMPLIFY_ATOL``.

    ``before`` are ONNX Runtime's outputs of ``proto`` on ``probe``. A refusal (or an
    onnxslim failure) returns ``proto`` itself with the reason in ``note``.
    """
    try:
        slim = simplify_graph(proto)
    except Exception as exc:   # onnxslim failing must not lose the export
        return SimplifyResult(proto, False, f"kept unsimplified: onnxslim failed ({type(exc).__name__}: {exc})",
                              None, None, {}, {})
    after = run_onnx(slim, probe)
    tol = SIMPLIFY_ATOL[precision]
    check = compare(before, after, atol=tol, name="onnxslim before vs after")
    delta = check.max_abs if check.shape_ok else math.inf
    if not check.passed:
        return SimplifyResult(proto, False, f"kept unsimplified: onnxslim changed the outputs by {delta:.2e} > "
                                            f"{tol:.0e} (ONNX Runtime, before vs after)", delta, after, {}, {})
    h0, h1 = op_histogram(proto), op_histogram(slim)
    removed = {op: h0[op] - h1.get(op, 0) for op in h0 if h0[op] > h1.get(op, 0)}
    added = {op: h1[op] - h0.get(op, 0) for op in h1 if h1[op] > h0.get(op, 0)}
    return SimplifyResult(slim, True, "simplified", delta, after, removed, added)


def op_histogram(proto: "onnx.ModelProto") -> Counter:
    return Counter(node.op_type for node in proto.graph.node)


# -- report ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and measured."""

    path: Path
    size_bytes: int
    opset: int
    ir_version: int
    precision: str
    io_dtype: str
    shape: str
    batch: str
    variant: str
    scale: int
    attention: str
    attention_layout: str               # export.onnx_attention form: native, chunked, mha
    weights_sha256: str
    metadata: dict[str, str]
    nodes_exported: int                 # after translation and cleanup, before onnxslim
    nodes: int                          # in the written file
    histogram: Counter
    removed_ops: dict[str, int]         # op type -> nodes onnxslim removed
    added_ops: dict[str, int]           # op type -> nodes onnxslim added (fusions)
    simplified: bool
    simplify_note: str
    probe_shape: tuple[int, ...]
    parity_before: float                # max |ONNX Runtime - PyTorch fp32|, before onnxslim
    parity_after: float | None          # same, after onnxslim and the attention layout (None if neither ran)
    simplify_delta: float | None        # max |after - before| in ONNX Runtime
    external_data: bool
    seconds: dict[str, float]
    verified: ComparisonResult | None = None   # the written file, loaded through runtimes.load, vs PyTorch
    trace: Trace | None = dataclasses.field(default=None, repr=False)
    fp16_safety: str | None = None             # fp16 exports: the safety check's summary (export.calibration)

    @property
    def parity(self) -> float:
        """Parity of the written graph."""
        return self.parity_after if self.parity_after is not None else self.parity_before

    def attention_form(self) -> str:
        h = self.histogram
        if h.get("MultiHeadAttention"):
            return f"com.microsoft MultiHeadAttention x{h['MultiHeadAttention']} (form mha)"
        if h.get("Attention"):
            return f"native ONNX Attention x{h['Attention']} (opset {self.opset}, form {self.attention_layout})"
        return (f"decomposed: MatMul x{h.get('MatMul', 0)} + Softmax x{h.get('Softmax', 0)} "
                f"(form {self.attention_layout})")

    def summary_rows(self) -> list[tuple[str, str]]:
        top = ", ".join(f"{op} {n}" for op, n in self.histogram.most_common(10))
        if self.simplified:
            removed = ", ".join(f"{op} -{n}" for op, n in sorted(self.removed_ops.items(), key=lambda kv: -kv[1]))
            added = ", ".join(f"{op} +{n}" for op, n in sorted(self.added_ops.items(), key=lambda kv: -kv[1]))
            nodes = (f"{self.nodes_exported} -> {self.nodes} after onnxslim and the attention layout"
                     + (f" (removed {removed})" if removed else "") + (f" (added {added})" if added else ""))
            parity = (f"max abs {self.parity_before:.2e} before, {self.parity_after:.2e} after simplification "
                      f"and attention layout (onnxslim change {self.simplify_delta:.1e})")
        else:
            nodes = f"{self.nodes} ({self.simplify_note})"
            parity = f"max abs {self.parity:.2e}"
        probe = ("unseen " if self.shape == "dynamic" else "random ") + "x".join(map(str, self.probe_shape))
        weights = ("random or not recorded (no weights hash given)" if self.weights_sha256 == "random"
                   else f"sha256 {self.weights_sha256[:16]}...")
        secs = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        return [
            ("artifact", str(self.path) + (" (+ external data)" if self.external_data else "")),
            ("size", human_size(self.size_bytes)),
            ("model", f"{self.variant} x{self.scale}, attention {self.attention}, weights {weights}"),
            ("graph", f"opset {self.opset}, IR {self.ir_version}, {self.precision} (I/O {self.io_dtype}), "
                      f"lr [{self._dims(INPUT_NAME)}] -> sr [{self._dims(OUTPUT_NAME)}]"),
            ("nodes", nodes),
            ("top ops", top),
            ("attention", self.attention_form()),
            ("parity", f"ONNX Runtime CPU vs PyTorch fp32 on {probe}: {parity}"),
            *([("fp16 safety", self.fp16_safety)] if self.fp16_safety else []),
            ("verified", self.verified.summary() if self.verified else "not verified"),
            ("time", secs),
            ("use", f"python -m runtimes.upscale INPUT OUTPUT --artifact {self.path}"),
        ]

    def _dims(self, which: str) -> str:
        b = "batch" if self.batch == "dynamic" else self.batch
        if self.shape == "dynamic":
            hw = ["height", "width"] if which == INPUT_NAME else [f"{self.scale}*height", f"{self.scale}*width"]
        else:
            h, w = (int(v) for v in self.shape.split("x"))
            k = 1 if which == INPUT_NAME else self.scale
            hw = [str(h * k), str(w * k)]
        return ", ".join([str(b), "3", *hw])

    def summary(self) -> str:
        return format_summary("ONNX export", self.summary_rows())


# -- 6. the whole export ---------------------------------------------------------------------------------
def export_onnx(model: "ESCBase", path: str | Path | None = None, opset: int = 18, precision: str = "fp32",
                fp32_io: bool = False, shape: Shape | str = "dynamic", batch: Batch | str | int = "dynamic",
                simplify: bool = True, weights_sha256: str | None = None, *, trace: Trace | None = None,
                compact_dynamic_kernel: bool = True, attention_form: str | None = None,
                attention_chunks: int = DEFAULT_CHUNKS, progress: Progress | None = None,
                calibration_images: str | Path | None = None) -> ExportReport:
    """Export ``model`` to ``path`` (default ``artifacts/<variant>_x<s>_<attn>_op<opset>_<precision>.onnx``).

    ``shape``: ``"dynamic"`` (any height and width) or ``(H, W)`` / ``"HxW"``.
    ``batch``: ``"dynamic"`` (the default: the tiler sends several tiles per call) or N.
    ``fp32_io``: with ``precision="fp16"``, keep float32 ``lr``/``sr`` (Casts at the
    boundary); ignored for fp32. ``trace``: a :class:`Trace` of the same model, precision,
    shape and batch (``report.trace`` of an earlier export) to skip re-tracing, e.g. to
    write opset 18 and 23 files. ``attention_form``: how attention is laid out for ONNX
    Runtime's CPU (:mod:`export.onnx_attention`; default :func:`default_attention_form`:
    ``chunked`` below opset 23, ``native`` at 23), ``attention_chunks`` query slices per
    attention in the chunked form. ``calibration_images``: fp16 only, the pictures the
    safety check records ranges on (:func:`fp16_guard`; default: scikit-image's samples).
    Raises :class:`OnnxExportError` for bad options.
    """
    _check_options(opset, precision)
    if calibration_images is not None and precision != "fp16":
        raise OnnxExportError(f"calibration pictures record ranges for the fp16 safety check; this export is "
                              f"{precision}: drop --calibration-images or export with --precision fp16")
    attention_form = attention_form or default_attention_form(opset)
    if attention_form not in ATTENTION_FORMS:
        raise OnnxExportError(f"attention form must be one of {', '.join(ATTENTION_FORMS)}, got {attention_form!r}")
    shape, batch = parse_shape(shape), parse_batch(batch)
    path = Path(path) if path is not None else default_output_path(model, opset, precision)
    seconds: dict[str, float] = {}
    if trace is None:
        trace = trace_model(model, precision, shape, batch, compact_dynamic_kernel, progress, calibration_images)
        seconds["trace"] = trace.seconds
    elif not trace.matches(precision, shape, batch):
        raise OnnxExportError(
            f"the given trace is {trace.precision}, shape {shape_label(trace.shape)}, batch {trace.batch}; "
            f"this export asks for {precision}, shape {shape_label(shape)}, batch {batch}")
    reference = trace.reference
    desc = reference.descriptor

    if progress:
        progress(f"translating to ONNX opset {opset}")
    start = time.perf_counter()
    proto = translate(trace, opset)
    io_fp32 = precision == "fp32" or fp32_io
    if precision == "fp16":
        keep_fp32_math(proto)
        if fp32_io:
            add_fp32_io(proto)
    seconds["translate"] = time.perf_counter() - start

    if progress:
        progress("checking parity in ONNX Runtime")
    start = time.perf_counter()
    probe = _probe(trace)
    with torch.no_grad():
        expected = reference(probe).numpy()
    before = run_onnx(proto, probe)
    parity_before = float(np.abs(before - expected).max())
    nodes_exported = len(proto.graph.node)
    seconds["parity"] = time.perf_counter() - start
    _check_parity(expected, before, precision, probe)

    final, simplified, note = proto, False, "not simplified (--no-simplify)"
    parity_after = delta = None
    removed: dict[str, int] = {}
    added: dict[str, int] = {}
    if simplify:
        if progress:
            progress("simplifying with onnxslim")
        start = time.perf_counter()
        result = simplify_checked(proto, probe, before, precision)
        final, simplified, note, delta = result.model, result.simplified, result.note, result.delta
        removed, added = result.removed_ops, result.added_ops
        if result.after is not None:
            parity_after = float(np.abs(result.after - expected).max())
        if not simplified:
            warnings.warn(f"error: {note}", RuntimeWarning, stacklevel=2)
        seconds["simplify"] = time.perf_counter() - start

    # The attention layout last: onnxslim would fold each slice of a constant bias (below
    # its size limit) into the file, 16 copies of what the graph gathers from the table.
    try:
        rewritten = rewrite_attention(final, attention_form, attention_chunks)
    except ValueError as exc:
        raise OnnxExportError(f"attention form {attention_form!r}: {exc}") from None
    if rewritten:
        start = time.perf_counter()
        laid_out = run_onnx(final, probe)
        _check_parity(expected, laid_out, precision, probe)
        parity_after = float(np.abs(laid_out - expected).max())
        seconds["attention form"] = time.perf_counter() - start

    meta = ArtifactMetadata.from_model(
        reference, weights_sha256, opset=opset, precision=precision, io_dtype="float32" if io_fp32 else "float16",
        shape=shape_label(shape), batch="dynamic" if batch == "dynamic" else str(batch))
    if progress:
        progress("writing, then verifying the file through runtimes.load")
    start = time.perf_counter()
    final = _finish(final, meta)
    external = _proto_bytes(final) > EXTERNAL_DATA_THRESHOLD
    reference_out = torch.from_numpy(expected)
    verified = _save(final, path, external,
                     lambda tmp: verify_artifact(tmp, [reference_out], [probe], precision)[0])
    seconds["check+save+verify"] = time.perf_counter() - start
    size = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size if external else 0)
    return ExportReport(
        path=path, size_bytes=size, opset=opset, ir_version=final.ir_version, precision=precision,
        io_dtype=meta.io_dtype, shape=meta.shape, batch=meta.batch, variant=desc.variant, scale=desc.scale,
        attention=desc.attention, attention_layout=attention_form, weights_sha256=meta.weights_sha256,
        metadata=meta.to_props(),
        nodes_exported=nodes_exported, nodes=len(final.graph.node), histogram=op_histogram(final),
        removed_ops=removed, added_ops=added, simplified=simplified, simplify_note=note,
        probe_shape=tuple(probe.shape), parity_before=parity_before, parity_after=parity_after,
        simplify_delta=delta, external_data=external, seconds=seconds, verified=verified, trace=trace,
        fp16_safety=trace.fp16_safety.summary() if trace.fp16_safety else None)


def _proto_bytes(proto: "onnx.ModelProto") -> int:
    """Serialized size; protobuf cannot measure messages above 2 GB, which need external data anyway."""
    try:
        return proto.ByteSize()
    except Exception:  # pragma: no cover - only for > 2 GB protos
        return 2**31


def _finish(proto: "onnx.ModelProto", meta: ArtifactMetadata) -> "onnx.ModelProto":
    import onnx

    proto.ir_version = IR_VERSION
    proto.producer_name = "esc-deploy"
    proto.producer_version = meta.toolkit_version or ""
    proto.doc_string = (f"{meta.variant} x{meta.scale} super-resolution (ESC family): "
                        f"input '{INPUT_NAME}' (N, 3, H, W) RGB in [0, 1], output '{OUTPUT_NAME}' "
                        f"(N, 3, {meta.scale}H, {meta.scale}W).")
    write_onnx_metadata(proto, meta)
    if _proto_bytes(proto) < EXTERNAL_DATA_THRESHOLD:   # larger ones are checked from disk by _save
        onnx.checker.check_model(proto, full_check=True)
    return proto


def _check_parity(expected: np.ndarray, got: np.ndarray, precision: str, probe: torch.Tensor) -> None:
    """Refuse a translated graph that does not reproduce PyTorch (the one threshold table).

    Checked in memory, before onnxslim and before anything is written, so a translation
    bug fails fast; the written file is verified again through ``runtimes.load``.
    Both sides are clamped to [0, 1], what a picture keeps, as :func:`export.verify.verify_artifact` does.
    """
    limit = threshold_for(precision)
    result = compare(np.clip(expected, 0, 1), np.clip(got, 0, 1), atol=limit.atol, min_psnr=limit.min_psnr,
                     name=f"random {'x'.join(map(str, probe.shape))} input")
    if not result.passed:
        raise OnnxExportError(
            f"the exported graph does not reproduce the PyTorch model at {precision} ({limit.describe()}): "
            f"{result.summary()} (ONNX Runtime CPU); nothing was written. This is an exporter bug: please "
            f"report it with the command line.")


def _save(proto: "onnx.ModelProto", path: Path, external: bool,
          verify: Callable[[Path], ComparisonResult] | None = None) -> ComparisonResult | None:
    """Write ``proto`` atomically; ``verify(temporary_path)`` runs before the file takes its name.

    A ``verify`` that raises (:class:`export.verify.ExportParityError`) leaves nothing behind.
    """
    import onnx

    with atomic_output(path) as tmp:
        if external:
            onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=EXTERNAL_DATA_MIN_TENSOR)
            onnx.checker.check_model(str(tmp), full_check=True)
        else:
            onnx.save_model(proto, str(tmp))
        return verify(tmp) if verify is not None else None
