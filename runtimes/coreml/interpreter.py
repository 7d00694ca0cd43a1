"""Execute a Core ML ML program with numpy, op by op, for checks on any OS.

Core ML prediction runs only on macOS; this runs what the package says (read by
:mod:`.reader`, one numpy kernel per op from :mod:`.kernels`, :mod:`.shape_kernels` and
:mod:`.constexpr`), so a conversion bug (a wrong permutation, a mis-read pad) shows on
Linux too. Compile-time ``constexpr_*`` operations (compressed weights) are expanded
once at load time.

Precision modes (``precision=``):

* ``"auto"`` (default): follow the program's declared types; an fp16 package (whose
  operations are typed fp16) has every fp16 result rounded to float16, so it behaves as
  the package would on a device that computes in fp16 (within accumulation-order and
  transcendental-function differences: device kernels may accumulate in fp16 too);
* ``"fp32"``: compute everything in float32; fp16 *weights* keep their stored fp16 values,
  activations are never rounded (isolates the weight quantisation error);
* ``"fp16"``: round every floating result to float16, whatever its declared type (what an
  fp32 package does when Core ML runs it on the Neural Engine, approximately): values are
  fp16 *between* ops, but each op computes inside in float32/float64;
* ``"ane"``: fp16 as the Neural Engine runs it: as ``"fp16"``, and inside the ops that sum
  (convolution, matmul, attention, softmax, layer_norm, reduce_mean/sum) every intermediate
  is fp16 and sums use an fp16 accumulator (:mod:`.fp16_kernels`), so an overflow inside an
  op (LayerNorm's squared deviations) shows as an infinity. Image inputs are quantised to
  the 8-bit levels a ``CVPixelBuffer`` holds and image outputs rounded to 8 bits, as Core
  ML does for image features.

Values are kept as float32 arrays even where the program says fp16 (numpy's float16
arithmetic is slow and has no BLAS); rounding to fp16 after every operation gives the
fp16 behaviour. An operation this interpreter does not know raises
:class:`UnsupportedOpError` naming it.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from . import kernels, shape_kernels  # noqa: F401  (they register their kernels)
from .constexpr import COMPILE_TIME_OPS
from .fp16_kernels import FP16_KERNELS, round16
from .reader import (
    DTYPES,
    FLOAT_TYPES,
    InterpreterError,
    MILOp,
    MILProgram,
    MILVar,
    UnsupportedOpError,
    load_program,
)
from .registry import KERNELS, Call

__all__ = ["PRECISIONS", "Interpreter", "quantise8", "round16"]


def quantise8(pixels: np.ndarray) -> np.ndarray:
    """0..255 values as the 8-bit levels of a Core ML image (rounded to nearest, clipped), as float32."""
    return np.clip(np.rint(np.asarray(pixels, dtype=np.float32)), 0.0, 255.0)


PRECISIONS = ("auto", "fp32", "fp16", "ane")
#: Precisions whose values are fp16 between ops whatever the program's declared types.
_FP16_VALUES = ("fp16", "ane")


class Interpreter:
    """Execute an ML program package with numpy.

    >>> interp = Interpreter("esc.mlpackage")          # doctest: +SKIP
    >>> y = interp.predict(x)                           # (B,3,h,w) float32 -> (B,3,sh,sw)
    """

    def __init__(self, program: MILProgram | str | os.PathLike, precision: str = "auto") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.program = program if isinstance(program, MILProgram) else load_program(program)
        self.precision = precision
        unknown = sorted({op.type for op in self.program.ops if op.type != "const" and op.type not in KERNELS})
        if unknown:
            raise UnsupportedOpError(
                f"{self.program.path}: the interpreter does not implement the operation(s) {', '.join(unknown)}; "
                f"add a kernel to runtimes/coreml/kernels.py or execute the package with "
                f"Core ML on macOS.")
        self._kernels = dict(KERNELS, **FP16_KERNELS) if precision == "ane" else KERNELS
        kinds = {f.name: f.type.WhichOneof("Type") for f in self.program.description.output}
        kinds.update({f.name: f.type.WhichOneof("Type") for f in self.program.description.input})
        #: Feature names that are Core ML images (8-bit levels in ``"ane"`` mode).
        self.image_features = frozenset(name for name, kind in kinds.items() if kind == "imageType")
        self._constants: dict[str, Any] = {}
        self._runtime_ops: list[MILOp] = []
        self._load_constants()
        self._release = self._last_uses()

    def _last_uses(self) -> list[list[str]]:
        """For each run-time op, the values no later op reads: dropped after it runs.

        Why: a full-size package computes thousands of tensors of several MB each (esc at a
        256x256 tile held over 20 GB when every one was kept); only the live ones are needed.
        """
        keep = set(self.program.outputs) | set(self._constants)
        last: dict[str, int] = {}
        for index, op in enumerate(self._runtime_ops):
            for name in op.input_names():
                last[name] = index
            for out in op.outputs:
                last.setdefault(out.name, index)  # produced and never read: dropped at once
        release: list[list[str]] = [[] for _ in self._runtime_ops]
        for name, index in last.items():
            if name not in keep:
                release[index].append(name)
        return release

    # -- constants ----------------------------------------------------------------------
    def _store(self, var: MILVar, value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = value.astype(np.float32)  # keep stored fp16 values exactly, as float32
        return value

    def _load_constants(self) -> None:
        for op in self.program.ops:
            if op.type == "const":
                val = self._store(op.outputs[0], op.attributes.get("val"))
                if self.precision in _FP16_VALUES and isinstance(val, np.ndarray) and val.dtype == np.float32:
                    val = round16(val)  # an fp32 package's weights, as an fp16 device holds them
                self._constants[op.outputs[0].name] = val
            elif op.type in COMPILE_TIME_OPS:
                call = Call(op, self._constants)
                result = KERNELS[op.type](call)
                self._constants[op.outputs[0].name] = self._finish(op.outputs[0], np.asarray(result), constant=True)
            else:
                self._runtime_ops.append(op)

    # -- execution ----------------------------------------------------------------------
    def _finish(self, var: MILVar, value: Any, constant: bool = False) -> Any:
        if not isinstance(value, np.ndarray):
            value = np.asarray(value)
        dtype = var.dtype
        if dtype in FLOAT_TYPES:
            if value.dtype != np.float32:
                value = value.astype(np.float32)
            if self.precision in _FP16_VALUES or (self.precision == "auto" and dtype == "FLOAT16"):
                value = round16(value)
        elif dtype == "BOOL":
            value = value.astype(bool)
        elif dtype in DTYPES and dtype != "STRING" and value.dtype.kind in "fiub":
            target = DTYPES[dtype][0]
            if value.dtype != target:
                if value.dtype.kind == "f":
                    value = np.trunc(value)
                value = value.astype(target)
        if var.shape is not None and None not in var.shape and value.shape != var.shape and not constant:
            raise InterpreterError(
                f"'{var.name}' has shape {value.shape}, the program declares {var.shape}: the interpreter "
                f"and the package disagree (an interpreter bug, or an input of the wrong size)")
        return value

    def run(self, inputs: dict[str, np.ndarray],
            trace: Callable[[MILOp, list[Any], dict[str, Any]], None] | None = None) -> dict[str, np.ndarray]:
        """Run the program on named inputs; returns the named outputs.

        ``trace(op, outputs, env)`` is called after every run-time op (checks, debugging); ``env``
        then holds the values still to be read (and this op's inputs and outputs).
        """
        env: dict[str, Any] = dict(self._constants)
        for var in self.program.inputs:
            if var.name not in inputs:
                raise InterpreterError(f"missing input {var.name!r} (the program takes "
                                       f"{', '.join(v.name for v in self.program.inputs)})")
            value = np.asarray(inputs[var.name])
            if var.shape is not None:
                dims_differ = any(d is not None and d != s for d, s in zip(var.shape, value.shape))
                if len(var.shape) != value.ndim or dims_differ:
                    raise InterpreterError(
                        f"input {var.name!r} has shape {value.shape}; the program expects "
                        f"{tuple('?' if d is None else d for d in var.shape)}")
            if self.precision == "ane" and var.name in self.image_features:
                value = quantise8(value)
            env[var.name] = self._finish(MILVar(var.name, var.dtype, None), value)
        for index, op in enumerate(self._runtime_ops):
            fn = self._kernels[op.type]
            try:
                result = fn(Call(op, env))
            except InterpreterError:
                raise
            except Exception as exc:
                raise InterpreterError(
                    f"{op.type} '{op.name}' (op #{op.index}) failed: {type(exc).__name__}: {exc}") from exc
            results = result if isinstance(result, (list, tuple)) and len(op.outputs) > 1 else [result]
            if len(results) != len(op.outputs):
                raise InterpreterError(
                    f"{op.type} '{op.name}' produced {len(results)} values for {len(op.outputs)} outputs")
            for var, value in zip(op.outputs, results):
                env[var.name] = self._finish(var, value)
            if trace is not None:
                trace(op, [env[o.name] for o in op.outputs], env)
            for name in self._release[index]:
                env.pop(name, None)
        outputs = {name: env[name] for name in self.program.outputs}
        if self.precision == "ane":
            outputs = {name: quantise8(v) if name in self.image_features else v for name, v in outputs.items()}
        return outputs

    @property
    def input_name(self) -> str:
        return self.program.inputs[0].name

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Single-input, single-output convenience: the program's first output for ``x``."""
        out = self.run({self.input_name: np.asarray(x, dtype=np.float32)})
        return out[self.program.outputs[0]]

    __call__ = predict
