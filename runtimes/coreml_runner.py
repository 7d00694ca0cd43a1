"""Run an exported Core ML package (``.mlpackage`` / ``.mlmodel``) behind the Runner interface.

``runtimes.base.load`` picks this runner for ``.mlpackage`` / ``.mlmodel`` paths and
``coreml:`` specs (a built-in registration in :mod:`runtimes.base`).

Two back-ends, chosen with ``backend=``:

* ``"coreml"``: Core ML itself through ``coremltools.models.MLModel.predict``, with a
  compute-unit choice (``compute_units="all" | "cpu_only" | "cpu_and_gpu" | "cpu_and_ne"``).
  Core ML prediction exists only on macOS;
* ``"interpreter"``: the numpy interpreter of :mod:`runtimes.coreml`, which
  executes the package's ML program op by op on any OS (slow, but it runs what the package
  says, so it checks conversions on Linux CI). ``interpreter_precision`` picks its
  arithmetic (``"auto"`` follows the program's fp16/fp32 types).

On macOS, :func:`profile_on_mac` compiles a package, predicts once, reads Core ML's
compute plan (the device each op is planned on, :func:`compute_plan`) and times
predictions: what the benchmark's Core ML rows call.

``backend="auto"`` (default) uses Core ML on macOS and the interpreter elsewhere;
:meth:`CoreMLRunner.describe` says which ran (``runtime`` is ``coreml`` or
``coreml-interpreter``).

Multifunction packages (one static function per tile, as the presets write them):
``function="tile_128x128"`` picks the function (``runtimes.load(path, function=...)``);
without it the package's default function runs. ``describe()`` lists every function.

Shapes: a fixed-shape package reports :attr:`Runner.fixed_shape`, so
:meth:`Runner.upscale` tiles at that shape. An enumerated-shapes package reports its
*largest* listed size as ``fixed_shape``: the shared tiler (and ``validation/parity.py``,
which tiles its reference the same way) then treats it exactly like a fixed-shape package.
:meth:`CoreMLRunner.infer` itself accepts every listed size (an app may pick the smallest
that holds its image); other sizes are padded at the bottom/right by edge replication up to
the smallest listed size that holds them, and the extra output is cropped (near that edge
the result then differs from a model run at the unpadded size). Image-I/O packages are fed
0..255 pixels and their image output is divided by 255: callers always see float32 in
[0, 1] terms.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import Runner, RunnerError
from .cli_args import format_size
from .coreml import (
    PRECISIONS,
    Interpreter,
    InterpreterError,
    UnsupportedOpError,
    load_program,
)
from .coreml.tools import import_coremltools
from .metadata import read_coreml_metadata, resolve_scale

__all__ = ["BACKENDS", "COMPUTE_UNITS", "CoreMLRunner", "compute_plan", "latency", "parse_compute_units",
           "profile_on_mac", "summarise_plan"]

#: Option value -> ``coremltools.ComputeUnit`` member name.
COMPUTE_UNITS: dict[str, str] = {
    "all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE",
}
_ALIASES = {"cpu": "cpu_only", "gpu": "cpu_and_gpu", "ne": "cpu_and_ne", "ane": "cpu_and_ne",
            "cpuandgpu": "cpu_and_gpu", "cpuandneuralengine": "cpu_and_ne", "cpu_and_neural_engine": "cpu_and_ne"}
BACKENDS = ("auto", "coreml", "interpreter")


def parse_compute_units(value: str | None) -> str:
    """Normalise a compute-unit option (``all``, ``cpu_only``, ``cpu_and_gpu``, ``cpu_and_ne``).

    Accepts ``-`` for ``_``, any case, coremltools' member names (``CPU_AND_NE``) and the
    short forms ``cpu``, ``gpu``, ``ne``/``ane``.
    """
    if value is None:
        return "all"
    key = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))
    if key not in COMPUTE_UNITS:
        raise RunnerError(
            f"unknown Core ML compute units {value!r}; choose one of {', '.join(COMPUTE_UNITS)} "
            f"(all = let Core ML pick among CPU, GPU and Neural Engine)")
    return key


def _is_macos() -> bool:
    return platform.system() == "Darwin"


def _coremltools() -> Any:
    return import_coremltools(RunnerError, "running Core ML packages")


class CoreMLRunner(Runner):
    """A Core ML ML-program package, run by Core ML (macOS) or by the numpy interpreter.

    Options:
        compute_units: ``all`` (default), ``cpu_only``, ``cpu_and_gpu``, ``cpu_and_ne``
            (Core ML back-end; checked but unused by the interpreter).
        backend: ``auto`` (default: Core ML on macOS, interpreter elsewhere), ``coreml``
            (refused off macOS) or ``interpreter``.
        interpreter_precision: ``auto`` (default), ``fp32``, ``fp16`` (fp16 between ops) or
            ``ane`` (fp16 inside ops too, 8-bit image I/O: the Neural Engine's arithmetic);
            interpreter only, see :mod:`runtimes.coreml.interpreter`.
        scale: needed only when the package has no ``esc.scale`` metadata and no fixed
            output shape to derive it from.
        function: the function of a multifunction package to run (``tile_128x128``, ...);
            default: the package's default function.
    """

    name = "coreml"
    options = ("compute_units", "backend", "interpreter_precision", "scale", "function")

    def __init__(self, artifact: str | os.PathLike[str], device: str = "cpu", compute_units: str | None = "all",
                 backend: str = "auto", interpreter_precision: str = "auto", scale: int | None = None,
                 function: str | None = None) -> None:
        self.artifact = os.fspath(artifact)
        path = Path(self.artifact)
        if not path.exists():
            raise RunnerError(f"no such Core ML package: {self.artifact}")
        if str(device) != "cpu":
            raise RunnerError(
                f"the Core ML runner takes device='cpu' only (got {device!r}); Core ML chooses CPU, GPU or "
                f"Neural Engine itself: use compute_units=all|cpu_only|cpu_and_gpu|cpu_and_ne")
        self.device = "cpu"
        self.compute_units = parse_compute_units(compute_units)
        if backend not in BACKENDS:
            raise RunnerError(f"unknown Core ML backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if interpreter_precision not in PRECISIONS:
            raise RunnerError(f"interpreter_precision must be one of {', '.join(PRECISIONS)}, "
                              f"got {interpreter_precision!r}")
        if backend == "auto":
            backend = "coreml" if _is_macos() else "interpreter"
        if backend == "coreml" and not _is_macos():
            raise RunnerError(
                f"Core ML prediction runs only on macOS (this is {platform.system() or 'an unknown OS'}): "
                f"coremltools can convert and save packages here but not execute them. Use backend='interpreter' "
                f"(the numpy interpreter, slow) or run on a Mac.")
        self.backend = backend
        self.interpreter_precision = interpreter_precision
        try:
            self.program = load_program(path, function=function)
        except InterpreterError as exc:
            raise RunnerError(f"cannot read {self.artifact}: {exc}") from exc
        self.function = self.program.function
        self._read_description(scale)
        self._model: Any = None
        self._interpreter: Any = None
        if backend == "coreml":
            ct = _coremltools()
            units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
            named = {"function_name": self.function} if len(self.program.functions) > 1 else {}
            try:
                self._model = ct.models.MLModel(self.artifact, compute_units=units, **named)
            except Exception as exc:
                raise RunnerError(f"Core ML cannot load {self.artifact}: {exc}") from exc
        else:
            try:
                self._interpreter = Interpreter(self.program, precision=interpreter_precision)
            except UnsupportedOpError as exc:
                raise RunnerError(str(exc)) from exc

    # -- description ---------------------------------------------------------------------
    def _read_description(self, scale: int | None) -> None:
        desc = self.program.description  # this function's, in a multifunction package
        if len(desc.input) != 1 or len(desc.output) < 1:
            raise RunnerError(f"{self.artifact} (function {self.function}): expected one input and one output, found "
                              f"{[i.name for i in desc.input]} -> {[o.name for o in desc.output]}")
        self.input_name = desc.input[0].name
        self.output_name = desc.output[0].name
        self.image_io = desc.input[0].type.WhichOneof("Type") == "imageType"
        self.output_image = desc.output[0].type.WhichOneof("Type") == "imageType"
        try:
            self.allowed_shapes = self.program.input_shapes()
        except InterpreterError as exc:
            raise RunnerError(str(exc)) from exc
        self.enumerated = len(self.allowed_shapes) > 1
        # Enumerated: tile at the largest listed size (see the module docstring).
        self.fixed_shape = max(self.allowed_shapes, key=lambda s: (s[0] * s[1], s)) if self.allowed_shapes else None
        meta = read_coreml_metadata(self.program.spec, source=self.artifact)
        if meta.scale is None:
            meta.scale = self._output_scale()
        self.metadata = meta
        self.scale = resolve_scale(meta, scale, self.artifact)
        self.input_multiple = meta.input_multiple or 1
        types = {v.dtype for op in self.program.ops if op.type != "const" for v in op.outputs}
        self.precision = meta.precision or ("fp16" if "FLOAT16" in types else "fp32")
        self.variant = meta.variant
        hist = self.program.histogram()
        self.attention = ("fused scaled_dot_product_attention" if hist.get("scaled_dot_product_attention")
                          else "matmul+softmax")

    def _output_scale(self) -> int | None:
        """The upscaling factor a fixed output shape implies (packages without ``esc.scale``)."""
        out = self.program.description.output[0].type
        if self.fixed_shape is None:
            return None
        if out.WhichOneof("Type") == "multiArrayType" and len(out.multiArrayType.shape) == 4:
            return int(out.multiArrayType.shape[2]) // self.fixed_shape[0]
        if out.WhichOneof("Type") == "imageType" and out.imageType.height:
            return int(out.imageType.height) // self.fixed_shape[0]
        return None

    def runtime_details(self) -> dict[str, Any]:
        ct_version = None
        try:
            ct_version = _coremltools().__version__
        except RunnerError:
            pass
        details: dict[str, Any] = {
            "runtime_version": ct_version,
            "target": self.program.target,
            "opset": self.program.opset,
            "function": self.function,
            "functions": self.program.functions,
            "compute_units": self.compute_units,
            "image_io": self.image_io,
            "compression": self.metadata.get("compression"),
            "enumerated_shapes": [list(s) for s in self.allowed_shapes] if self.enumerated else None,
        }
        if self.backend == "coreml":
            details.update({"runtime": "coreml",
                            "backend": f"Core ML MLModel.predict (compute units {self.compute_units})",
                            "device": f"coreml:{self.compute_units}"})
        else:
            details.update({
                "runtime": "coreml-interpreter",
                "backend": (f"numpy interpreter (runtimes.coreml, precision {self.interpreter_precision})"
                            + ("" if _is_macos() else "; Core ML prediction needs macOS")),
                "interpreter_precision": self.interpreter_precision,
            })
        return details

    # -- inference -----------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        """A fixed-shape function takes its shape; an enumerated one any size up to a listed one.

        Sizes in the messages are WIDTHxHEIGHT, as the exporter's flags take them.
        """
        if self.enumerated:
            self._target_shape(height, width)
        elif self.fixed_shape is not None and (height, width) != tuple(self.fixed_shape):
            others = [name for name in self.program.functions if name != self.function]
            hint = f"; other functions of the package: {', '.join(others)} (function=...)" if others else ""
            raise RunnerError(
                f"{self.artifact} (function {self.function}) takes {format_size(*self.fixed_shape)} inputs, got "
                f"{format_size(height, width)} (use upscale(), which tiles at the fixed shape{hint})")

    def _target_shape(self, h: int, w: int) -> tuple[int, int]:
        if not self.allowed_shapes or (h, w) in self.allowed_shapes:
            return h, w
        fits = [s for s in self.allowed_shapes if s[0] >= h and s[1] >= w]
        if not fits:
            listed = ", ".join(format_size(a, b) for a, b in self.allowed_shapes)
            raise RunnerError(
                f"{self.artifact} accepts the input sizes {listed}; {format_size(h, w)} is larger than all of them. "
                f"Use upscale(), which tiles at the largest listed size")
        return min(fits, key=lambda s: (s[0] * s[1], s))

    def _predict_one(self, x: np.ndarray) -> np.ndarray:
        """(1, 3, h, w) float32 in [0, 1] -> (1, 3, sh, sw) float32."""
        feed = x * 255.0 if self.image_io else x
        if self._interpreter is not None:
            out = self._interpreter.run({self.program.inputs[0].name: feed.astype(np.float32)})
            y = np.asarray(out[self.program.outputs[0]], dtype=np.float32)
        else:
            if self.image_io:
                from PIL import Image

                pixels = np.clip(np.rint(feed[0].transpose(1, 2, 0)), 0, 255).astype(np.uint8)
                result = self._model.predict({self.input_name: Image.fromarray(pixels, "RGB")})
            else:
                result = self._model.predict({self.input_name: feed.astype(np.float32)})
            value = result[self.output_name]
            if hasattr(value, "convert"):  # a PIL image
                value = np.asarray(value.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)[None]
            y = np.asarray(value, dtype=np.float32)
        return y / 255.0 if self.output_image else y

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        b, _, h, w = batch.shape
        th, tw = self._target_shape(h, w)
        array = batch.detach().to("cpu", torch.float32).numpy()
        if (th, tw) != (h, w):
            array = np.pad(array, [(0, 0), (0, 0), (0, th - h), (0, tw - w)], mode="edge")
        outs = [self._predict_one(np.ascontiguousarray(array[i:i + 1])) for i in range(b)]
        out = np.concatenate(outs)[:, :, :h * self.scale, :w * self.scale]
        return torch.from_numpy(np.ascontiguousarray(out)).to(batch.device)


def latency(runner: Runner, shape: tuple[int, ...] | None = None, warmup: int = 3, repeat: int = 10,
            seed: int = 0) -> dict[str, Any]:
    """Time ``runner.infer`` on one random batch: median / p10 / p90 in milliseconds.

    ``shape``: ``(h, w)``, ``(b, h, w)`` or ``(b, 3, h, w)``; default the runner's fixed
    shape (batch 1). On macOS this times Core ML itself (choose compute units on the
    runner); elsewhere it times the interpreter, which says nothing about device speed.
    """
    if shape is None:
        if getattr(runner, "fixed_shape", None) is None:
            raise RunnerError("give a shape: this runner has no fixed input shape")
        shape = tuple(runner.fixed_shape)  # type: ignore[arg-type]
    if len(shape) == 2:
        shape = (1, 3) + tuple(shape)
    elif len(shape) == 3:
        shape = (shape[0], 3) + tuple(shape[1:])
    if len(shape) != 4 or shape[1] != 3:
        raise RunnerError(f"latency shape must be (h, w), (b, h, w) or (b, 3, h, w); got {shape}")
    if warmup < 0 or repeat < 1:
        raise RunnerError(f"warmup must be >= 0 and repeat >= 1 (got {warmup}, {repeat})")
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    for _ in range(warmup):
        runner.infer(x)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        runner.infer(x)
        times.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(times)

    def pct(q: float) -> float:
        if len(ordered) == 1:
            return ordered[0]
        pos = q * (len(ordered) - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    described = runner.describe()
    return {
        "median_ms": statistics.median(times), "p10_ms": pct(0.10), "p90_ms": pct(0.90),
        "min_ms": ordered[0], "max_ms": ordered[-1], "repeat": repeat, "warmup": warmup, "shape": list(shape),
        "runtime": described.get("runtime"), "backend": described.get("backend"),
        "compute_units": described.get("compute_units"),
    }



def _require_macos(purpose: str) -> None:
    if not _is_macos():
        raise RunnerError(f"{purpose} needs Core ML, which runs only on macOS (this is "
                          f"{platform.system() or 'an unknown OS'}); on Linux use the numpy interpreter "
                          f"(backend='interpreter', interpreter_precision='ane' for fp16 as the Neural Engine runs it)")


def _device_name(device: Any) -> str:
    from coremltools.models.compute_device import (
        MLCPUComputeDevice,
        MLGPUComputeDevice,
        MLNeuralEngineComputeDevice,
    )

    for cls, name in ((MLNeuralEngineComputeDevice, "neural_engine"), (MLGPUComputeDevice, "gpu"),
                      (MLCPUComputeDevice, "cpu")):
        if isinstance(device, cls):
            return name
    return type(device).__name__


def compute_plan(package: str | os.PathLike[str], compute_units: str = "all",
                 function: str | None = None) -> list[dict[str, Any]]:
    """Where Core ML plans to run each op of ``package``: one row per non-const op (macOS only).

    ``function``: only that function's ops (a multifunction package plans every function).

    Rows: ``function``, ``op`` (MIL op type), ``output`` (its first output's name), ``device``
    (``neural_engine``, ``gpu``, ``cpu``; None where Core ML cannot say), ``supported`` (the
    devices that could run it) and ``cost`` (Core ML's estimated share of the work, 0..1).
    Uses coremltools' ``MLComputePlan`` (coremltools >= 8, macOS 14.4+) on the compiled model.
    """
    _require_macos("the Core ML compute plan")
    ct = _coremltools()
    try:
        from coremltools.models.compute_plan import MLComputePlan
    except ImportError as exc:
        raise RunnerError(f"coremltools {ct.__version__} has no MLComputePlan (needs coremltools >= 8 and "
                          f"macOS 14.4+): {exc}") from exc
    units = getattr(ct.ComputeUnit, COMPUTE_UNITS[parse_compute_units(compute_units)])
    try:
        compiled = ct.models.MLModel(os.fspath(package), compute_units=units).get_compiled_model_path()
        plan = MLComputePlan.load_from_path(path=compiled, compute_units=units)
    except Exception as exc:
        raise RunnerError(f"Core ML cannot load or plan {package}: {exc}") from exc
    program = plan.model_structure.program
    if program is None:
        raise RunnerError(f"{package} is not an ML program (the compute plan covers ML programs only)")
    rows: list[dict[str, Any]] = []
    for fname, planned in program.functions.items():
        if function is not None and fname != function:
            continue
        for op in planned.block.operations:
            if op.operator_name == "const":
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            cost = plan.get_estimated_cost_for_mlprogram_operation(op)
            rows.append({
                "function": fname, "op": op.operator_name, "output": op.outputs[0].name if op.outputs else "",
                "device": _device_name(usage.preferred_compute_device) if usage else None,
                "supported": [_device_name(d) for d in usage.supported_compute_devices] if usage else [],
                "cost": cost.weight if cost else None,
            })
    return rows


def summarise_plan(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Op counts and estimated cost per device, and the ops planned off the Neural Engine."""
    counts = Counter(str(r["device"]) for r in rows)
    cost: Counter = Counter()
    for r in rows:
        cost[str(r["device"])] += r["cost"] or 0.0
    off = [f"{r['op']} {r['output']} -> {r['device']}" for r in rows if r["device"] != "neural_engine"]
    return {"ops": len(rows), "ops_per_device": dict(counts), "cost_per_device": dict(cost),
            "ops_off_neural_engine": off}


def profile_on_mac(package: str | os.PathLike[str], compute_units: str = "all",
                   shape: tuple[int, ...] | None = None, warmup: int = 3, repeat: int = 10,
                   function: str | None = None) -> dict[str, Any]:
    """Compile and load ``package`` (``function`` of a multifunction one; default: its default
    function), predict once, read its compute plan, time predictions (macOS only).

    What the benchmark's Core ML rows call: ``load_ms`` (compile + load), ``first_predict_ms``,
    the plan summary (:func:`summarise_plan`) and :func:`latency`'s median / p10 / p90.
    """
    _require_macos("profiling a Core ML package")
    start = time.perf_counter()
    runner = CoreMLRunner(package, backend="coreml", compute_units=compute_units, function=function)
    load_ms = (time.perf_counter() - start) * 1000.0
    if shape is None and runner.fixed_shape is None:
        raise RunnerError("give a shape: this package has no fixed input shape")
    h, w = tuple(shape[-2:]) if shape is not None else runner.fixed_shape  # type: ignore[misc]
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    runner.infer(x)
    first_ms = (time.perf_counter() - start) * 1000.0
    plan = summarise_plan(compute_plan(package, compute_units, runner.function))
    timing = latency(runner, (1, 3, h, w), warmup=warmup, repeat=repeat)
    return {"package": os.fspath(package), "function": runner.function, "load_ms": load_ms,
            "first_predict_ms": first_ms, "plan": plan, **timing}
