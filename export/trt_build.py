"""TensorRT engines for ESC: the library behind ``export/to_trt.py``.

Pipeline (each step a function below):

1. **ONNX** (:func:`export_for_trt`): ``plugin`` attention writes the plugin-form graph
   (:func:`export.plugin_onnx.export_plugin_onnx`: one ``esc::window_attention`` node per
   block, AOT implementation requested); ``native`` writes the opset-23 graph whose
   attention is the ONNX ``Attention`` op (:func:`export.onnx_export.export_onnx`). The
   graph carries the precision (strong typing, below). A file already there whose
   ``esc.*`` metadata matches (weights hash, attention, precision, opset, toolkit version,
   dynamic shapes) is reused.
0. **profile** (:meth:`ShapeProfile.check_kernel_launch`): for ``plugin`` attention the max
   shape must fit the kernel's CUDA grid (65535 windows, 65535 batch x heads); checked
   before any export, with the largest allowed size in the message.
2. **environment** (:func:`probe_environment`): TensorRT (>= 10.9 with ``tensorrt.plugin``;
   >= 10.14 for ``native``, whose ONNX ``Attention`` older parsers reject), a CUDA GPU,
   Triton >= 3.4 (AOT kernel compilation). What is missing is listed with its fix.
3. **engine** (:func:`build_engine`): ``trt.Builder`` -> network (explicit batch;
   ``STRONGLY_TYPED`` by default: the precision is the graph's, as TensorRT 11 requires;
   ``typing="weak"`` keeps TensorRT 10's fp32 graph + ``BuilderFlag.FP16/BF16`` route),
   ``PREFER_AOT_PYTHON_PLUGINS``, ``trt.OnnxParser.parse_from_file`` with the plugin
   registered (``native``: every parsed ``IAttention`` marked decomposable, see
   :func:`mark_attention_decomposable`), one optimisation profile over ``lr`` (min/opt/max), a timing cache file next
   to the engine (read before, written after), ``build_serialized_network``, atomic write.
   The engine's *file name* encodes precision, typing, attention, shape range, TensorRT
   version, GPU name and the ONNX file's hash (:func:`engine_tag`): an engine is reused
   only on an exact name match, so a stale one (other TensorRT, GPU, weights or profile)
   is never loaded. The sidecar ``<engine>.json`` (:func:`runtimes.metadata.write_sidecar`)
   records the ``esc.*`` metadata and the build facts for
   :class:`runtimes.trt_runner.TensorRTRunner`.

:func:`build_trt_engine` runs steps 1-3 for a model: the one entry point of
``export/to_trt.py`` and of the benchmarks. Parity is checked by the caller with
:func:`export.verify.verify_artifact` (the one threshold table); :func:`synthetic_images` and
:func:`load_images` give it pictures inside the profile, :func:`benchmark` a latency summary.

Running an engine without Python: AOT engines embed the kernel, so ``trtexec
--loadEngine=<engine> --shapes=lr:1x3x256x256`` runs them as is (no ``--dynamicPlugins``:
that flag loads C++ plugin libraries, and this plugin is a Python one; building from the
ONNX file therefore needs Python, i.e. this module).
"""
from __future__ import annotations

import dataclasses
import datetime
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from models.errors import ESCError
from models.kernels.launch import grid_limit_problem
from models.kernels.triton_support import MIN_TRITON, triton_too_old_message
from runtimes.cli_args import SIZE_SYNTAX, parse_size
from runtimes.metadata import (
    ArtifactMetadata,
    read_onnx_metadata,
    sidecar_path,
    write_sidecar,
)
from runtimes.plugin_ops.contract import ATTENTION_LABEL, PLUGIN_ID

from .common import atomic_output, sha256_file

if TYPE_CHECKING:  # pragma: no cover
    from models import ESCBase

ATTENTION_MODES = ("plugin", "native")
#: TensorRT's ONNX parser imports opset-23 ``Attention`` (as ``IAttention``) from this version on.
MIN_NATIVE_ATTENTION_TRT = (10, 14)
PRECISIONS = ("fp16", "bf16", "fp32")
TYPINGS = ("strong", "weak")
INPUT_NAME = "lr"
NATIVE_OPSET = 23
PLUGIN_OPSET = 18
DEFAULT_PROFILE = ((1, 3, 16, 16), (1, 3, 256, 256), (4, 3, 512, 512))
DEFAULT_ARTIFACT_DIR = Path("artifacts")

Progress = Callable[[str], None]


class TrtBuildError(ESCError, ValueError):
    """A TensorRT build request that cannot be satisfied (bad option, failed parse or build)."""


class TrtEnvironmentError(TrtBuildError):
    """This machine lacks what a build needs; the ONNX file is written and kept.

    ``onnx`` is the step that wrote (or reused) the file the engine would be built from;
    ``missing`` holds one sentence per missing requirement, each with its fix.
    """

    def __init__(self, onnx: "OnnxStep", missing: list[str]) -> None:
        self.onnx, self.missing = onnx, list(missing)
        super().__init__(f"cannot build a TensorRT engine on this machine (the ONNX file is ready: {onnx.path}): "
                         + " ".join(self.missing))


# -- shapes -------------------------------------------------------------------------------------------
def parse_shape_arg(text: str | tuple | list, what: str = "shape") -> tuple[int, int, int, int]:
    """A profile shape -> ``(N, 3, H, W)``.

    Accepted: ``"1x3x256x256"`` / ``"lr:1x3x256x256"`` (TensorRT's NxCxHxW, as trtexec
    writes it), a 4-tuple, or the toolkit's one size syntax ``WIDTHxHEIGHT``
    (:func:`runtimes.cli_args.parse_size`, batch 1): ``"1280x720"`` is ``(1, 3, 720, 1280)``.
    """
    if isinstance(text, (tuple, list)):
        values = [int(v) for v in text]
    else:
        body = str(text).strip().lower()
        if ":" in body:
            name, body = body.split(":", 1)
            if name.strip() not in (INPUT_NAME, ""):
                raise TrtBuildError(f"{what}: the input is called '{INPUT_NAME}', not {name!r}")
        if body.count("x") == 1:
            try:
                height, width = parse_size(body)
            except ValueError as exc:
                raise TrtBuildError(f"{what}: {exc}") from None
            return (1, 3, height, width)
        try:
            values = [int(v) for v in body.split("x")]
        except ValueError:
            raise TrtBuildError(f"{what} must be NxCxHxW (1x3x256x256) or {SIZE_SYNTAX}, got {text!r}") from None
    if len(values) != 4:
        raise TrtBuildError(f"{what} must be NxCxHxW (1x3x256x256) or {SIZE_SYNTAX}, got {text!r}")
    if values[1] != 3:
        raise TrtBuildError(f"{what}: ESC takes 3-channel RGB input, got {values[1]} channels in {text!r}")
    if min(values) < 1:
        raise TrtBuildError(f"{what}: every dim must be >= 1, got {text!r}")
    return tuple(values)  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile over ``lr``: min <= opt <= max in every dim."""

    min: tuple[int, int, int, int]
    opt: tuple[int, int, int, int]
    max: tuple[int, int, int, int]

    @classmethod
    def parse(cls, min_shape: Any = None, opt_shape: Any = None, max_shape: Any = None) -> "ShapeProfile":
        lo = parse_shape_arg(min_shape, "--min-shape") if min_shape is not None else DEFAULT_PROFILE[0]
        hi = parse_shape_arg(max_shape, "--max-shape") if max_shape is not None else DEFAULT_PROFILE[2]
        if opt_shape is not None:
            opt = parse_shape_arg(opt_shape, "--opt-shape")
        else:   # the default opt, pulled into [min, max]
            opt = tuple(min(max(d, a), b) for d, a, b in zip(DEFAULT_PROFILE[1], lo, hi))
        profile = cls(lo, opt, hi)  # type: ignore[arg-type]
        profile.validate()
        return profile

    def validate(self) -> None:
        for axis, name in enumerate(("batch", "channels", "height", "width")):
            a, b, c = self.min[axis], self.opt[axis], self.max[axis]
            if not a <= b <= c:
                raise TrtBuildError(f"profile {name}: need min <= opt <= max, got {a}, {b}, {c} "
                                    f"(--min-shape/--opt-shape/--max-shape)")

    def check_kernel_launch(self, window: int, heads: int) -> None:
        """Refuse a max shape the plugin kernel cannot launch (CUDA grid limits), before any work.

        The AOT kernel's grid is a TensorRT shape expression evaluated at run time: a
        too-large profile would build and then fail to launch, so it is checked here.
        """
        batch, _, height, width = self.max
        problem = grid_limit_problem(batch, height, width, window, heads)
        if problem:
            raise TrtBuildError(f"--max-shape {'x'.join(map(str, self.max))} is too large for the fused attention "
                                f"kernel: {problem}. Lower --max-shape; runtimes.upscale tiles larger pictures")

    def label(self) -> str:
        lo, opt, hi = self.min, self.opt, self.max
        return (f"b{lo[0]}-{hi[0]}_{lo[2]}x{lo[3]}-{hi[2]}x{hi[3]}_opt{opt[0]}x{opt[2]}x{opt[3]}")

    def describe(self) -> str:
        return " .. ".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))


# -- environment --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Environment:
    """What this machine has for the TensorRT path."""

    tensorrt_version: str | None = None
    tensorrt_error: str | None = None
    has_plugin_api: bool = False
    has_aot: bool = False
    cuda: bool = False
    gpu_name: str | None = None
    compute_capability: str | None = None
    cuda_error: str | None = None
    triton_version: str | None = None
    triton_error: str | None = None

    def missing(self, attention: str = "plugin") -> list[str]:
        """One sentence per missing requirement, each with its fix (empty: ready to build)."""
        from runtimes.plugin_ops.tensorrt_plugin import (
            MIN_TRT_VERSION,
            tensorrt_install_hint,
            tensorrt_version_tuple,
        )

        out = []
        version = tensorrt_version_tuple(self.tensorrt_version or "0")
        if self.tensorrt_version is None:
            out.append(f"TensorRT is not installed ({self.tensorrt_error}). {tensorrt_install_hint()}.")
        elif attention == "plugin" and (not self.has_plugin_api or version < MIN_TRT_VERSION):
            out.append(f"TensorRT {self.tensorrt_version} is too old for the Python plugin path: TensorRT >= "
                       f"{'.'.join(map(str, MIN_TRT_VERSION))} (tensorrt.plugin with aot_impl) is needed: "
                       f"pip install -U tensorrt-cu12 (from NVIDIA's index), or use --attention native.")
        elif attention == "native" and version < MIN_NATIVE_ATTENTION_TRT:
            out.append(native_attention_too_old(self.tensorrt_version))
        if not self.cuda:
            out.append(f"no CUDA GPU is visible to PyTorch ({self.cuda_error}): TensorRT builds and runs engines on "
                       f"an NVIDIA GPU; install the NVIDIA driver and a CUDA build of torch "
                       f"(pip install torch --index-url https://download.pytorch.org/whl/cu128).")
        if attention == "plugin" and self.triton_error is not None:
            out.append(f"{self.triton_error}; the plugin's kernel is compiled with Triton.")
        return out

    def rows(self) -> list[tuple[str, str]]:
        return [("TensorRT", self.tensorrt_version or f"missing ({self.tensorrt_error})"),
                ("GPU", f"{self.gpu_name} (sm_{self.compute_capability})" if self.cuda
                 else f"none ({self.cuda_error})"),
                ("Triton", (self.triton_version or "missing") + (f" ({self.triton_error})" if self.triton_error
                                                                 else ""))]


def probe_environment() -> Environment:
    """Look for TensorRT, a CUDA GPU and Triton without failing."""
    env = Environment()
    try:
        import tensorrt as trt

        env.tensorrt_version = str(getattr(trt, "__version__", "unknown"))
        try:
            import tensorrt.plugin as trtp

            env.has_plugin_api = True
            env.has_aot = hasattr(trtp, "aot_impl")
        except ImportError:
            env.has_plugin_api = False
    except ImportError as exc:
        env.tensorrt_error = f"import tensorrt: {exc}"
    except Exception as exc:  # a broken install (missing libnvinfer) raises OSError and friends
        env.tensorrt_error = f"import tensorrt failed: {type(exc).__name__}: {exc}"
    if torch.cuda.is_available():
        env.cuda = True
        env.gpu_name = torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        env.compute_capability = f"{major}{minor}"
    else:
        env.cuda_error = f"torch {torch.__version__}, torch.cuda.is_available() is False"
    try:
        import triton

        env.triton_version = triton.__version__
        env.triton_error = triton_too_old_message(triton.__version__)
    except ImportError as exc:
        env.triton_error = (f"Triton is not installed ({exc}): pip install 'triton>={'.'.join(map(str, MIN_TRITON))}' "
                            f"(CUDA builds of torch ship it)")
    return env


def native_attention_too_old(version: str) -> str:
    """The gate's message: TensorRT parses ONNX ``Attention`` (opset 23) from 10.14 on."""
    floor = ".".join(map(str, MIN_NATIVE_ATTENTION_TRT))
    return (f"TensorRT {version} cannot parse the ONNX Attention op (opset 23) that --attention native writes: its "
            f"ONNX parser supports it from TensorRT {floor} (older ones fail with \"Plugin not found\"). Upgrade "
            f"(pip install -U tensorrt-cu12 from NVIDIA's index) or use --attention plugin.")


# -- names --------------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"


def engine_tag(precision: str, typing: str, attention: str, profile: ShapeProfile, trt_version: str | None,
               gpu_name: str | None, onnx_sha256: str) -> str:
    """What an engine was built from and for; part of its file name (reuse on exact match only)."""
    trt = f"trt{trt_version}" if trt_version else "trt-missing"
    gpu = slug(gpu_name) if gpu_name else "no-gpu"
    typing_label = "" if typing == "strong" else "-weak"
    return f"{attention}_{precision}{typing_label}_{profile.label()}_{trt}_{gpu}_onnx{onnx_sha256[:10]}"


def engine_path_for(output: Path, tag: str) -> Path:
    """``out/x.engine`` + tag -> ``out/x.<tag>.engine`` (``.plan`` kept when asked for)."""
    suffix = output.suffix if output.suffix in (".engine", ".plan") else ".engine"
    stem = output.name[: -len(output.suffix)] if output.suffix in (".engine", ".plan") else output.name
    return output.with_name(f"{stem}.{tag}{suffix}")


def onnx_path_for(output: Path, attention: str, graph_precision: str) -> Path:
    """``out/x.engine`` -> ``out/x.plugin.fp16.onnx`` (the ONNX the engine is built from)."""
    stem = output.name[: -len(output.suffix)] if output.suffix in (".engine", ".plan") else output.name
    return output.with_name(f"{stem}.{attention}.{graph_precision}.onnx")


def timing_cache_path(output: Path, trt_version: str | None, gpu_name: str | None) -> Path:
    """One timing cache per TensorRT version and GPU, next to the engine."""
    stem = output.name[: -len(output.suffix)] if output.suffix in (".engine", ".plan") else output.name
    trt = f"trt{trt_version}" if trt_version else "trt-missing"
    return output.with_name(f"{stem}.{trt}_{slug(gpu_name or 'no-gpu')}.timing-cache")


def default_output(model: "ESCBase", precision: str, attention: str) -> Path:
    d = model.descriptor
    return DEFAULT_ARTIFACT_DIR / f"{d.variant}_x{d.scale}_{attention}_{precision}.engine"


# -- 1. ONNX ------------------------------------------------------------------------------------------
def graph_precision(precision: str, typing: str) -> str:
    """The ONNX graph's precision: the requested one (strong typing) or fp32 (weak typing)."""
    return precision if typing == "strong" else "fp32"


def graph_opset(attention: str, precision: str) -> int:
    from .plugin_onnx import BF16_MIN_OPSET

    if attention == "native":
        return NATIVE_OPSET
    return BF16_MIN_OPSET if precision == "bf16" else PLUGIN_OPSET


#: The ``esc.*`` keys an ONNX file must share with the request to be reused.
REUSE_KEYS = ("weights_sha256", "precision", "opset", "shape", "batch", "toolkit_version", "variant", "scale",
              "io_dtype", "attention", "plugin_aot")


def expected_metadata(attention: str, precision: str, opset: int, weights_sha256: str | None, jit: bool,
                      model: "ESCBase") -> dict[str, str]:
    """The ``esc.*`` entries (:data:`REUSE_KEYS`) a reusable ONNX file must have."""
    extra = {"plugin_aot": "0" if jit else "1"} if attention == "plugin" else {}
    meta = ArtifactMetadata.from_model(
        model, weights_sha256, precision=precision, opset=opset, shape="dynamic", batch="dynamic", io_dtype="float32",
        attention=ATTENTION_LABEL if attention == "plugin" else "sdpa", **extra)
    return {f"esc.{key}": value for key in REUSE_KEYS if (value := meta.get(key)) is not None}


def onnx_is_current(path: Path, expected: dict[str, str]) -> bool:
    """Whether ``path`` exists, passes ``onnx.checker`` and has every ``expected`` metadata entry."""
    if not path.is_file():
        return False
    try:
        import onnx

        meta = read_onnx_metadata(path).to_props()
        if any(meta.get(k) != v for k, v in expected.items()):
            return False
        onnx.checker.check_model(str(path))
    except Exception:   # unreadable or invalid: export it again
        return False
    return True


@dataclasses.dataclass
class OnnxStep:
    """The ONNX file an engine is built from: where, whether reused, its summary and metadata."""

    path: Path
    reused: bool
    rows: list[tuple[str, str]]
    metadata: ArtifactMetadata
    seconds: float


def export_for_trt(model: "ESCBase", output: Path, attention: str = "plugin", precision: str = "fp16",
                   typing: str = "strong", weights_sha256: str | None = None, jit: bool = False,
                   reexport: bool = False, progress: Progress | None = None) -> OnnxStep:
    """Write (or reuse) the ONNX file the engine ``output`` is built from."""
    from .plugin_onnx import export_plugin_onnx

    if attention not in ATTENTION_MODES:
        raise TrtBuildError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    if typing not in TYPINGS:
        raise TrtBuildError(f"typing must be strong or weak, got {typing!r}")
    gp = graph_precision(precision, typing)
    if attention == "plugin" and not any(name.endswith("relative_position_bias") for name, _ in model.named_parameters()):
        raise TrtBuildError(f"{model.descriptor.variant} has no relative-position bias table for the window-attention "
                            f"plugin (its attention is bias-free): use --attention native (TensorRT >= 10.14)")
    if attention == "native" and gp == "bf16":
        raise TrtBuildError("a bf16 graph is available with --attention plugin only (export.onnx_export writes "
                            "fp32 and fp16); use --attention plugin, --precision fp16, or --typing weak")
    opset = graph_opset(attention, gp)
    path = onnx_path_for(output, attention, gp)
    expected = expected_metadata(attention, gp, opset, weights_sha256, jit, model)
    start = time.perf_counter()
    if not reexport and onnx_is_current(path, expected):
        if progress:
            progress(f"reusing {path} (same weights, precision, opset and toolkit version)")
        return OnnxStep(path, True, [("onnx", f"{path} (reused)")], read_onnx_metadata(path),
                        time.perf_counter() - start)
    if attention == "plugin":
        report = export_plugin_onnx(model, path, opset=opset, shape="dynamic", weights_sha256=weights_sha256,
                                    batch="dynamic", precision=gp, aot=not jit, check_parity=gp == "fp32",
                                    progress=progress)
    else:
        from . import onnx_export as ox

        native = model
        if native.attention not in ox.EXPORTABLE_ATTENTION:
            import copy

            native = copy.deepcopy(model).set_attention("sdpa")
        # attention_form="native": one mask-free or masked Attention per layer, whatever ONNX Runtime prefers.
        report = ox.export_onnx(native, path, opset=opset, precision=gp, fp32_io=True, shape="dynamic",
                                batch="dynamic", weights_sha256=weights_sha256, attention_form="native",
                                progress=progress)
    # The metadata as written (the one schema), whichever exporter wrote it.
    return OnnxStep(path, False, report.summary_rows(), read_onnx_metadata(path), time.perf_counter() - start)


# -- 3. engine ----------------------------------------------------------------------------------------
#: Layer types that bound an ``IAttention`` -> the class :func:`mark_attention_decomposable` casts to.
ATTENTION_BOUNDARY_LAYERS = (("ATTENTION_INPUT", "IAttentionInputLayer"), ("ATTENTION_OUTPUT", "IAttentionOutputLayer"))


def mark_attention_decomposable(network: Any, trt: Any) -> int:
    """Let every parsed ``IAttention`` fall back to several kernels; returns how many were marked.

    TensorRT's ONNX ``Attention`` importer builds non-decomposable ``IAttention``s, which
    must map to one fused kernel; ESC's (head size 16, a 1024x1024 float mask) may have
    none, and the build would fail. Each ``IAttention`` shows in the network as its
    boundary layers, whose ``attention`` property is the ``IAttention``. Two things about
    TensorRT's Python objects decide how they are found:

    * ``network.get_layer(i)`` returns the base ``ILayer`` (pybind11 cannot see the
      layer's own class), which has no ``attention``: each layer is cast by its ``type``
      (``layer.__class__ = trt.IAttentionInputLayer``), as Polygraphy does;
    * the Python wrappers are made per call and freed after, so ``id()`` values repeat:
      the ``IAttention``s are told apart and counted by ``name``.

    Raises :class:`TrtBuildError` when the network holds no ``IAttention`` (nothing would
    be marked and the build would fail later, or silently differ from what was asked).
    """
    layer_types = trt.LayerType
    casts = {getattr(layer_types, kind): getattr(trt, cls) for kind, cls in ATTENTION_BOUNDARY_LAYERS
             if hasattr(layer_types, kind)}
    if not casts:
        raise TrtBuildError(f"TensorRT {getattr(trt, '__version__', '?')} has no IAttention layers "
                            f"(LayerType.ATTENTION_INPUT): --attention native needs TensorRT >= "
                            f"{'.'.join(map(str, MIN_NATIVE_ATTENTION_TRT))}")
    marked: set[str] = set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        cast = casts.get(layer.type)
        if cast is None:
            continue
        layer.__class__ = cast
        attention = layer.attention
        attention.decomposable = True
        marked.add(attention.name)
    if not marked:
        raise TrtBuildError(f"the parsed network ({network.num_layers} layers) holds no IAttention to mark "
                            f"decomposable: the --attention native ONNX file should hold one Attention node per "
                            f"attention layer; re-export it (--reexport) or use --attention plugin")
    return len(marked)


def softmax_precision(attention: str, precision: str) -> str:
    """What the summary says about the attention softmax's precision (issue: it is not the graph's)."""
    if attention == "plugin":
        return "fp32 (the fused kernel keeps the softmax statistics and accumulator in fp32)"
    if precision == "fp32":
        return "fp32"
    return (f"chosen by TensorRT (likely {precision}): its ONNX Attention importer ignores softmax_precision, "
            f"which export.onnx_export sets to fp32 for fp16 graphs; parity is checked at the {precision} threshold")


# -- 3. engine (build) -----------------------------------------------------------------------------------------
def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for i in range(getattr(parser, "num_errors", 0)):
        err = parser.get_error(i)
        desc = err.desc() if hasattr(err, "desc") else str(err)
        node = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        errors.append(f"{desc}" + (f" (node {node}, op {op})" if node or op else ""))
    return errors


def _build_serialized_engine(onnx_path: Path, engine_path: Path, profile: ShapeProfile, precision: str = "fp16",
                             typing: str = "strong", attention: str = "plugin", timing_cache: Path | None = None,
                             workspace_gib: float | None = None, jit: bool = False, verbose: bool = False,
                             progress: Progress | None = None, ptx_version: int | None = None,
                             ptx_target: str | None = None) -> tuple[float, dict[str, Any] | None]:
    """Parse ``onnx_path`` and build a serialized engine at ``engine_path``; (seconds, plugin info)."""
    from runtimes.plugin_ops.tensorrt_plugin import import_tensorrt, register_plugin

    trt, _ = import_tensorrt()
    start = time.perf_counter()
    plugin = register_plugin(target=ptx_target, ptx_version=ptx_version) if attention == "plugin" else None
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags_enum = trt.NetworkDefinitionCreationFlag
    flags = 0
    # TensorRT < 10 needs EXPLICIT_BATCH; 10.x networks are always explicit-batch (the flag is a deprecated no-op).
    if hasattr(flags_enum, "EXPLICIT_BATCH") and int(str(trt.__version__).split(".")[0]) < 10:
        flags |= 1 << int(flags_enum.EXPLICIT_BATCH)
    if typing == "strong":
        flags |= 1 << int(flags_enum.STRONGLY_TYPED)
    if attention == "plugin":
        preference = "PREFER_JIT_PYTHON_PLUGINS" if jit else "PREFER_AOT_PYTHON_PLUGINS"
        if hasattr(flags_enum, preference):
            flags |= 1 << int(getattr(flags_enum, preference))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if progress:
        progress(f"parsing {onnx_path}")
    if not parser.parse_from_file(str(onnx_path)):
        raise TrtBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(_parser_errors(parser)))
    if attention == "native":
        marked = mark_attention_decomposable(network, trt)
        if progress:
            progress(f"{marked} IAttention(s) marked decomposable, by name (several kernels allowed where no fused "
                     f"one fits)")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if INPUT_NAME not in names:
        raise TrtBuildError(f"{onnx_path} has inputs {names}; expected '{INPUT_NAME}'")

    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if typing == "weak" and precision != "fp32":
        flag = {"fp16": "FP16", "bf16": "BF16"}[precision]
        if not hasattr(trt.BuilderFlag, flag):
            raise TrtBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (weak typing was removed in "
                                f"TensorRT 11): use --typing strong")
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TensorRT runs fp32 convolutions in TF32 by default (10 mantissa bits); an fp32 engine
        # promises the fp32 parity threshold, so it computes in fp32.
        config.clear_flag(trt.BuilderFlag.TF32)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    if progress:
        progress(f"building the engine ({precision}, {typing} typing, profile {profile.describe()}); "
                 f"this takes minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrtBuildError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    with atomic_output(engine_path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(serialized)
    if timing_cache is not None:
        updated = config.get_timing_cache()
        if updated is not None:
            with atomic_output(timing_cache) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(updated.serialize())
    return time.perf_counter() - start, plugin


# -- 1-3 for a model: the one entry point ---------------------------------------------------------
@dataclasses.dataclass
class EngineBuild:
    """What :func:`build_trt_engine` produced (or, for a dry run, would build)."""

    engine: Path
    onnx: OnnxStep
    environment: Environment
    profile: ShapeProfile
    timing_cache: Path
    onnx_sha256: str
    built: bool                  # a new engine was built in this call
    reused: bool                 # an engine with the same name was already there
    build_seconds: float = 0.0

    def plan_rows(self, precision: str, typing: str, attention: str, jit: bool) -> list[tuple[str, str]]:
        """The summary rows of what is (to be) built, for the CLI's boxes."""
        return [
            ("onnx", f"{self.onnx.path}" + (" (reused)" if self.onnx.reused else "")),
            ("engine", f"{self.engine}" + (" (exists: would be reused)" if self.reused and not self.built else "")),
            ("timing cache", str(self.timing_cache)),
            ("profile", f"lr {self.profile.describe()} (min .. opt .. max)"),
            ("precision", f"{precision}, {typing} typing, attention {attention}" + (" (JIT plugin)" if jit else "")),
            ("softmax", softmax_precision(attention, precision)),
            *self.environment.rows(),
        ]


def build_trt_engine(model: "ESCBase", output: Path | str | None = None, *, precision: str = "fp16",
                     attention: str = "plugin", profile: ShapeProfile | None = None, typing: str = "strong",
                     weights_sha256: str | None = None, jit: bool = False, reexport: bool = False,
                     rebuild: bool = False, dry_run: bool = False, workspace_gib: float | None = None,
                     ptx_version: int | None = None, ptx_target: str | None = None, verbose: bool = False,
                     progress: Progress | None = None) -> EngineBuild:
    """Build (or reuse) the TensorRT engine of ``model``; the one builder of the toolkit.

    ``output`` is the engine path stem (default ``artifacts/<variant>_x<scale>_<attention>_
    <precision>.engine``); the engine is written as ``<stem>.<tag>.engine`` with the
    ONNX file it is built from beside it, and ``<engine>.json`` as its sidecar. An engine
    whose name matches exactly is reused unless ``rebuild``. ``dry_run`` stops before the
    build. Raises :class:`TrtEnvironmentError` (the ONNX file is kept) when TensorRT, a
    GPU or Triton is missing, :class:`TrtBuildError` for bad options or a failed build.
    Parity is the caller's: :func:`export.verify.verify_artifact` on ``result.engine``.
    """
    profile = profile or ShapeProfile.parse()
    if attention == "plugin":
        attn = model.attention_modules()
        profile.check_kernel_launch(max(a.window for a in attn), max(a.heads for a in attn))
    output = Path(output) if output is not None else default_output(model, precision, attention)
    step = export_for_trt(model, output, attention, precision, typing, weights_sha256, jit, reexport, progress)
    env = probe_environment()
    onnx_sha = file_digest(step.path)
    tag = engine_tag(precision, typing, attention, profile, env.tensorrt_version, env.gpu_name, onnx_sha)
    engine = engine_path_for(output, tag)
    result = EngineBuild(engine=engine, onnx=step, environment=env, profile=profile,
                         timing_cache=timing_cache_path(output, env.tensorrt_version, env.gpu_name),
                         onnx_sha256=onnx_sha, built=False, reused=engine.is_file() and not rebuild)
    if dry_run:
        return result
    missing = env.missing(attention)
    if missing:
        raise TrtEnvironmentError(step, missing)
    build = {
        "tensorrt_version": env.tensorrt_version, "gpu": env.gpu_name, "compute_capability": env.compute_capability,
        "precision": precision, "typing": typing, "attention": attention,
        "profile": {"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)},
        "onnx": str(step.path), "onnx_sha256": onnx_sha,
        "plugin": f"{PLUGIN_ID} ({'JIT' if jit else 'AOT'})" if attention == "plugin" else None,
    }
    if result.reused:
        if progress:
            progress(f"reusing {engine} (exact name match: same precision, profile, TensorRT, GPU and ONNX)")
        if not sidecar_path(engine).is_file():
            write_sidecar(engine, step.metadata, build)
        return result
    result.build_seconds, _ = _build_serialized_engine(
        step.path, engine, profile, precision, typing, attention, result.timing_cache, workspace_gib, jit, verbose,
        progress, ptx_version=ptx_version, ptx_target=ptx_target)
    build["built_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    build["build_seconds"] = round(result.build_seconds, 1)
    write_sidecar(engine, step.metadata, build)
    result.built = True
    return result


# -- 4. pictures for the parity check, and latency ----------------------------------------------------------------------------
def synthetic_images(profile: ShapeProfile, count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic test pictures (smooth gradients, edges, texture) at sizes inside the profile.

    Sizes: the profile's opt, an odd size near it (both sides need window padding), and a
    small one near the min, each clamped to [min, max].
    """
    lo, opt, hi = profile.min, profile.opt, profile.max
    sizes = [(opt[2], opt[3]), (opt[2] - 13, opt[3] + 7), (lo[2] + 21, lo[3] + 37)]
    gen = torch.Generator().manual_seed(seed)
    images = []
    for h, w in sizes[:count]:
        h, w = min(max(h, lo[2]), hi[2]), min(max(w, lo[3]), hi[3])
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 3 * yy), yy, 0.5 + 0.4 * torch.cos(9 * xx * yy)])
        edges = ((xx * 7).floor() % 2 == (yy * 5).floor() % 2).float()
        img = 0.7 * base + 0.2 * edges + 0.1 * torch.rand(3, h, w, generator=gen)
        images.append(img.clamp(0, 1)[None])
    return images


def load_images(directory: Path, profile: ShapeProfile, limit: int = 5) -> list[torch.Tensor]:
    """Up to ``limit`` pictures from ``directory`` (cropped to the profile's max sides)."""
    from runtimes.imageio import read_image, to_tensor

    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp",
                                                                                 ".tif", ".tiff", ".webp"))
    if not files:
        raise TrtBuildError(f"no images in {directory}")
    hi = profile.max
    return [to_tensor(read_image(p).rgb)[:, :, : hi[2], : hi[3]] for p in files[:limit]]


@torch.no_grad()
def benchmark(fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], iterations: int = 30,
              warmup: int = 5, device: str = "cuda", dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Latency of ``fn`` on a random ``shape`` batch (CUDA events): median, p90, mean in ms."""
    x = torch.rand(shape, device=device, dtype=dtype)
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
            "mean_ms": sum(times) / len(times)}


def file_digest(path: Path) -> str:
    """SHA-256 of a file (the ONNX part of an engine's name)."""
    return sha256_file(path)
