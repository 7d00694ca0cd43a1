"""A numpy interpreter for Core ML ML programs (``.mlpackage``), for checks on any OS.

Core ML prediction runs only on macOS, so on Linux nothing would ever execute the
program that ``export/to_coreml.py`` writes: a conversion bug (a wrong permutation, a
mis-read pad) would ship unnoticed. This module reads the package itself, the way Core
ML does, and executes the MIL program with numpy:

* ``Data/com.apple.CoreML/model.mlmodel`` is parsed with coremltools' protobuf classes
  (``coremltools.proto.Model_pb2``); the program is ``model.mlProgram``, whose ``main``
  function holds one block of operations in execution order;
* constants stored in ``weights/weight.bin`` are read with coremltools' blob reader
  (``coremltools.libmilstoragepython``) or, where that native module is missing, by
  parsing the documented blob layout (64-byte storage header, then for every blob a
  64-byte metadata record ``sentinel 0xDEADBEEF, dtype, size, data offset`` and the data);
* every operation runs in numpy, in program order; compile-time ``constexpr_*``
  operations (palettized / int8 weights) are expanded once at load time.

Precision modes (``precision=``):

* ``"auto"`` (default): follow the program's declared types; an fp16 package (whose
  operations are typed fp16) has every fp16 result rounded to float16, so it behaves as
  the package would on a device that computes in fp16 (within accumulation-order and
  transcendental-function differences: device kernels may accumulate in fp16 too);
* ``"fp32"``: compute everything in float32; fp16 *weights* keep their stored fp16 values,
  activations are never rounded (isolates the weight quantisation error);
* ``"fp16"``: round every floating result to float16, whatever its declared type (what an
  fp32 package does when Core ML runs it on the Neural Engine, approximately).

Values are kept as float32 arrays even where the program says fp16 (numpy's float16
arithmetic is slow and has no BLAS); rounding to fp16 after every operation gives the
fp16 behaviour. An operation this interpreter does not know raises
:class:`UnsupportedOpError` naming it.
"""
from __future__ import annotations

import math
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "ArgRef", "InterpreterError", "MILOp", "MILProgram", "MILVar", "Interpreter", "UnsupportedOpError",
    "load_program", "op_histogram",
]

PRECISIONS = ("auto", "fp32", "fp16")
DATA_DIR = Path("Data") / "com.apple.CoreML"


class InterpreterError(RuntimeError):
    """The package cannot be read or executed."""


class UnsupportedOpError(InterpreterError):
    """The program contains an operation the interpreter does not implement."""


# --------------------------------------------------------------------------------------
# Program representation
# --------------------------------------------------------------------------------------
# MIL data types (MIL.proto's DataType enum) -> (numpy dtype of the decoded value, bits).
_DTYPES: dict[str, tuple[Any, int]] = {
    "BOOL": (np.bool_, 8), "FLOAT16": (np.float16, 16), "FLOAT32": (np.float32, 32),
    "FLOAT64": (np.float64, 64), "INT8": (np.int8, 8), "INT16": (np.int16, 16), "INT32": (np.int32, 32),
    "INT64": (np.int64, 64), "UINT8": (np.uint8, 8), "UINT16": (np.uint16, 16), "UINT32": (np.uint32, 32),
    "UINT64": (np.uint64, 64), "INT4": (np.int8, 4), "UINT4": (np.uint8, 4), "UINT1": (np.uint8, 1),
    "UINT2": (np.uint8, 2), "UINT3": (np.uint8, 3), "UINT6": (np.uint8, 6), "STRING": (object, 0),
}
_FLOAT_TYPES = ("FLOAT16", "FLOAT32", "FLOAT64")
_SUB_BYTE = ("INT4", "UINT4", "UINT1", "UINT2", "UINT3", "UINT6")
# ``cast``'s dtype strings.
_CAST_DTYPES = {
    "fp16": "FLOAT16", "fp32": "FLOAT32", "fp64": "FLOAT64", "int32": "INT32", "int64": "INT64",
    "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "bool": "BOOL",
}
# Function opset names (``CoreMLn``) -> deployment targets.
OPSET_TARGETS = {"CoreML5": "iOS15", "CoreML6": "iOS16", "CoreML7": "iOS17", "CoreML8": "iOS18",
                 "CoreML9": "iOS26"}


@dataclass
class MILVar:
    """A named value's declared type: ``dtype`` (MIL name) and ``shape`` (None = unknown dim)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...] | None  # None: not a tensor (list/dict) or variadic rank

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


@dataclass
class ArgRef:
    """One argument binding: a reference to a named value or an inline constant."""

    name: str | None = None
    value: Any = None


@dataclass
class MILOp:
    type: str
    name: str
    inputs: dict[str, list[ArgRef]]
    outputs: list[MILVar]
    attributes: dict[str, Any] = field(default_factory=dict)
    index: int = 0

    def input_names(self) -> list[str]:
        return [a.name for args in self.inputs.values() for a in args if a.name is not None]


@dataclass
class MILProgram:
    """The ``main`` function of an ML program package, with its constants decoded lazily."""

    path: Path
    spec: Any  # coremltools.proto.Model_pb2.Model
    function: str
    opset: str
    inputs: list[MILVar]
    outputs: list[str]
    ops: list[MILOp]
    weights_dir: Path | None

    @property
    def target(self) -> str:
        return OPSET_TARGETS.get(self.opset, self.opset)

    @property
    def description(self) -> Any:
        return self.spec.description

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.spec.description.metadata.userDefined)

    def histogram(self, include_const: bool = False) -> Counter:
        return op_histogram(self, include_const)

    def var_types(self) -> dict[str, MILVar]:
        types = {v.name: v for v in self.inputs}
        for op in self.ops:
            for out in op.outputs:
                types[out.name] = out
        return types

    def consumers(self) -> dict[str, list[MILOp]]:
        users: dict[str, list[MILOp]] = {}
        for op in self.ops:
            for name in op.input_names():
                users.setdefault(name, []).append(op)
        return users


def op_histogram(program: MILProgram, include_const: bool = False) -> Counter:
    """Operation counts by type (``const`` left out unless asked for)."""
    return Counter(op.type for op in program.ops if include_const or op.type != "const")


def _proto_modules():
    try:
        from coremltools.proto import MIL_pb2, Model_pb2
    except Exception as exc:  # pragma: no cover - coremltools is a dependency of this module
        raise InterpreterError(
            f"reading a Core ML package needs coremltools' protobuf classes ({exc}); "
            f"pip install coremltools") from exc
    return MIL_pb2, Model_pb2


def _resolve_package(path: str | os.PathLike) -> tuple[Path, Path, Path | None]:
    """(package root, model.mlmodel file, weights dir or None) for a .mlpackage or .mlmodel."""
    root = Path(path)
    if root.is_dir():
        spec_file = root / DATA_DIR / "model.mlmodel"
        if not spec_file.is_file():
            manifest = root / "Manifest.json"
            hint = "" if manifest.is_file() else " (it has no Manifest.json either: not an .mlpackage)"
            raise InterpreterError(f"{root} has no {DATA_DIR / 'model.mlmodel'}{hint}")
        weights = root / DATA_DIR / "weights"
        return root, spec_file, weights if weights.is_dir() else None
    if root.is_file():
        weights = root.parent / "weights"
        return root, root, weights if weights.is_dir() else None
    raise InterpreterError(f"no Core ML model at {root}")


def _value_type(vt, dtype_names) -> tuple[str, tuple[int | None, ...] | None]:
    kind = vt.WhichOneof("type")
    if kind == "tensorType":
        tt = vt.tensorType
        dtype = dtype_names[tt.dataType]
        if tt.rank < 0:
            return dtype, None
        dims: list[int | None] = []
        for d in tt.dimensions:
            dims.append(int(d.constant.size) if d.WhichOneof("dimension") == "constant" else None)
        return dtype, tuple(dims)
    if kind == "stateType":
        return _value_type(vt.stateType.wrappedType, dtype_names)
    return kind or "unknown", None


def _unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    """Unpack ``count`` ``nbits``-wide fields packed LSB-first into bytes (MIL's layout)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.int32)
    values = (bits << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
    return values.astype(np.int8 if signed else np.uint8)


class _BlobFile:
    """Reads blobs from a ``weight.bin``: coremltools' native reader, else our own parser."""

    SENTINEL = 0xDEADBEEF

    def __init__(self, path: Path) -> None:
        self.path = path
        self._native = None
        try:
            from coremltools.libmilstoragepython import _BlobStorageReader

            self._native = _BlobStorageReader(str(path))
        except Exception:  # the native module is optional: fall back to parsing the file
            self._native = None
        self._data: memoryview | None = None

    def _bytes(self) -> memoryview:
        if self._data is None:
            self._data = memoryview(self.path.read_bytes())
        return self._data

    def read(self, offset: int, dtype: str, count: int) -> np.ndarray:
        if self._native is not None:
            reader = {
                "FLOAT32": "read_float_data", "FLOAT16": "read_fp16_data", "INT8": "read_int8_data",
                "UINT8": "read_uint8_data", "INT16": "read_int16_data", "UINT16": "read_uint16_data",
                "INT32": "read_int32_data", "UINT32": "read_uint32_data", "INT4": "read_int4_data",
                "UINT4": "read_uint4_data", "UINT1": "read_uint1_data", "UINT2": "read_uint2_data",
                "UINT3": "read_uint3_data", "UINT6": "read_uint6_data",
            }.get(dtype)
            if reader is not None and hasattr(self._native, reader):
                raw = np.asarray(getattr(self._native, reader)(offset))
                if dtype == "FLOAT16":
                    raw = raw.view(np.float16)
                return raw[:count] if dtype in _SUB_BYTE else raw
        return self._parse(offset, dtype, count)

    def _parse(self, offset: int, dtype: str, count: int) -> np.ndarray:
        data = self._bytes()
        sentinel, _mil_dtype, size, data_offset = struct.unpack_from("<IIQQ", data, offset)
        if sentinel != self.SENTINEL:
            raise InterpreterError(
                f"{self.path}: no blob metadata at offset {offset} (sentinel {sentinel:#x}, expected "
                f"{self.SENTINEL:#x}); the weight file does not match model.mlmodel")
        raw = np.frombuffer(data[data_offset: data_offset + size], dtype=np.uint8)
        np_dtype, bits = _DTYPES[dtype]
        if dtype in _SUB_BYTE:
            return _unpack_bits(raw, bits, count, signed=dtype == "INT4")
        return raw.view(np_dtype)


def _decode_tensor_value(tv, dtype: str, shape: tuple[int, ...] | None) -> Any:
    kind = tv.WhichOneof("value")
    if kind is None:
        values: Any = []
    elif kind == "bytes":
        values = [bytes(tv.bytes.values)]  # one packed byte string, not a repeated field
    else:
        values = list(getattr(tv, kind).values)
    if dtype == "STRING":
        return values[0] if shape == () and values else np.array(values, dtype=object)
    np_dtype, bits = _DTYPES[dtype]
    count = int(np.prod(shape)) if shape else 1
    if kind == "bytes":
        raw = np.frombuffer(values[0] if values else b"", dtype=np.uint8)
        if dtype in _SUB_BYTE:
            arr = _unpack_bits(raw, bits, count, signed=dtype == "INT4")
        else:
            arr = raw.view(np_dtype)[:count]
    else:
        arr = np.array(values, dtype=np_dtype)
        if arr.size == 1 and count > 1:  # a splat constant
            arr = np.full(count, arr.reshape(()), dtype=np_dtype)
    return arr.reshape(shape if shape is not None else (-1,))


def load_program(path: str | os.PathLike, function: str | None = None) -> MILProgram:
    """Parse an ML program package (or ``.mlmodel``) into a :class:`MILProgram`."""
    MIL_pb2, Model_pb2 = _proto_modules()
    root, spec_file, weights_dir = _resolve_package(path)
    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(spec_file.read_bytes())
    except Exception as exc:
        raise InterpreterError(f"{spec_file} is not a Core ML model protobuf ({exc})") from exc
    if spec.WhichOneof("Type") != "mlProgram":
        raise InterpreterError(
            f"{root} is a Core ML '{spec.WhichOneof('Type')}' model, not an ML program: the interpreter "
            f"runs ML programs only (convert with convert_to='mlprogram').")
    prog = spec.mlProgram
    if function is None:
        function = spec.description.defaultFunctionName or ("main" if "main" in prog.functions else None)
    if function not in prog.functions:
        raise InterpreterError(f"{root}: no function {function!r} (has {', '.join(prog.functions)})")
    func = prog.functions[function]
    opset = func.opset
    block = func.block_specializations[opset]
    dtype_names = {v: k for k, v in MIL_pb2.DataType.items()}

    inputs = []
    for named in func.inputs:
        dtype, shape = _value_type(named.type, dtype_names)
        inputs.append(MILVar(named.name, dtype, shape))

    program = MILProgram(path=root, spec=spec, function=function, opset=opset, inputs=inputs,
                         outputs=list(block.outputs), ops=[], weights_dir=weights_dir)
    blob_files: dict[str, _BlobFile] = {}

    def decode_value(value, name: str) -> Any:
        dtype, shape = _value_type(value.type, dtype_names)
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            iv = value.immediateValue
            ikind = iv.WhichOneof("value")
            if ikind == "tensor":
                return _decode_tensor_value(iv.tensor, dtype, shape)
            if ikind == "list":
                return [decode_value(v, name) for v in iv.list.values]
            if ikind == "tuple":
                return tuple(decode_value(v, name) for v in iv.tuple.values)
            if ikind == "dictionary":
                return {decode_value(kv.key, name): decode_value(kv.value, name) for kv in iv.dictionary.values}
            raise InterpreterError(f"{name}: unsupported immediate value kind {ikind!r}")
        if kind == "blobFileValue":
            if weights_dir is None:
                raise InterpreterError(f"{name} is stored in a weight file but {root} has no weights folder")
            file_name = value.blobFileValue.fileName.split("/")[-1]
            blob = blob_files.get(file_name)
            if blob is None:
                blob_path = weights_dir / file_name
                if not blob_path.is_file():
                    raise InterpreterError(f"{name} is stored in {blob_path}, which does not exist")
                blob = blob_files[file_name] = _BlobFile(blob_path)
            count = int(np.prod(shape)) if shape else 1
            arr = blob.read(int(value.blobFileValue.offset), dtype, count)
            if arr.size != count:
                raise InterpreterError(
                    f"{name}: the weight file holds {arr.size} values at offset "
                    f"{value.blobFileValue.offset}, the program declares {count} ({shape})")
            return arr.reshape(shape)
        raise InterpreterError(f"{name}: value without data ({kind})")

    for index, op_spec in enumerate(block.operations):
        outputs = []
        for named in op_spec.outputs:
            dtype, shape = _value_type(named.type, dtype_names)
            outputs.append(MILVar(named.name, dtype, shape))
        attributes = {}
        for key, value in op_spec.attributes.items():
            attributes[key] = decode_value(value, f"{op_spec.type} {key}")
        inputs_map: dict[str, list[ArgRef]] = {}
        for key, arg in op_spec.inputs.items():
            refs = []
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name":
                    refs.append(ArgRef(name=binding.name))
                else:
                    refs.append(ArgRef(value=decode_value(binding.value, f"{op_spec.type} {key}")))
            inputs_map[key] = refs
        name = attributes.get("name")
        name = str(name) if name is not None else (outputs[0].name if outputs else f"op{index}")
        program.ops.append(MILOp(op_spec.type, name, inputs_map, outputs, attributes, index))
    return program


# --------------------------------------------------------------------------------------
# Operation kernels
# --------------------------------------------------------------------------------------
Kernel = Callable[["_Call"], Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*names: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        for name in names:
            KERNELS[name] = fn
        return fn
    return register


class _Call:
    """Inputs of one operation as the kernels see them."""

    __slots__ = ("op", "env")

    def __init__(self, op: MILOp, env: dict[str, Any]) -> None:
        self.op = op
        self.env = env

    def has(self, key: str) -> bool:
        return key in self.op.inputs or (key != "name" and key in self.op.attributes)

    def _one(self, ref: ArgRef) -> Any:
        if ref.name is not None:
            try:
                return self.env[ref.name]
            except KeyError:
                raise InterpreterError(
                    f"{self.op.type} '{self.op.name}' reads {ref.name!r}, which is not defined before it") from None
        return ref.value

    def __call__(self, key: str, default: Any = None) -> Any:
        refs = self.op.inputs.get(key)
        if not refs:
            # iOS 16 compile-time ops (constexpr_*) carry their parameters as attributes.
            if key != "name" and key in self.op.attributes:
                return self.op.attributes[key]
            return default
        return self._one(refs[0])

    def list(self, key: str) -> list[Any]:
        return [self._one(r) for r in self.op.inputs.get(key, [])]

    def int(self, key: str, default: int | None = None) -> int:
        v = self(key, default)
        return int(np.asarray(v).reshape(()))

    def ints(self, key: str, default: Any = None) -> list[int] | None:
        v = self(key, default)
        return None if v is None else [int(i) for i in np.asarray(v).reshape(-1)]

    def float(self, key: str, default: float | None = None) -> float:
        v = self(key, default)
        return float(np.asarray(v).reshape(()))

    def bool(self, key: str, default: bool = False) -> bool:
        v = self(key, default)
        return bool(np.asarray(v).reshape(()))

    def str(self, key: str, default: str | None = None) -> str:
        v = self(key, default)
        if isinstance(v, np.ndarray):
            v = v.reshape(-1)[0]
        return str(v)

    def x(self) -> np.ndarray:
        return np.asarray(self("x"))


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _f32(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == np.float32 else a.astype(np.float32)


# -- elementwise --------------------------------------------------------------------------
def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Kernel:
    def run(c: _Call) -> np.ndarray:
        return fn(np.asarray(c("x")), np.asarray(c("y")))
    return run


def _floor_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if np.issubdtype(np.result_type(x, y), np.integer):
        return np.floor_divide(x, y)
    return np.floor(x / y)


for _name, _fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": lambda x, y: np.true_divide(x, y),
    "floor_div": _floor_div, "mod": np.mod, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal, "not_equal": np.not_equal,
    "less": np.less, "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}.items():
    KERNELS[_name] = _binary(_fn)


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Kernel:
    def run(c: _Call) -> np.ndarray:
        return fn(c.x())
    return run


def _erf(x: np.ndarray) -> np.ndarray:
    """Vectorised erf to float32 accuracy (math.erf is scalar only; no scipy dependency)."""
    x = np.asarray(x, dtype=np.float64)
    # Abramowitz-Stegun 7.1.26 is only ~1e-7 absolute; use the complementary-error-function
    # continued fraction via the W. J. Cody rational approximations instead (double precision).
    ax = np.abs(x)
    out = np.empty_like(ax)
    small = ax < 0.5
    if small.any():
        t = ax[small] ** 2
        p = ((((0.185777706184603153 * t + 3.16112374387056560) * t + 113.864154151050156) * t
              + 377.485237685302021) * t + 3209.37758913846947)
        q = ((((t + 23.6012909523441209) * t + 244.024637934444173) * t + 1282.61652607737228) * t
             + 2844.23683343917062)
        out[small] = ax[small] * p / q
    mid = (~small) & (ax < 4.0)
    if mid.any():
        y = ax[mid]
        p = (((((((2.15311535474403846e-8 * y + 0.564188496988670089) * y + 8.88314979438837594) * y
                 + 66.1191906371416295) * y + 298.635138197400131) * y + 881.952221241769090) * y
              + 1712.04761263407058) * y + 2051.07837782607147) * y + 1230.33935479799725
        q = (((((((y + 15.7449261107098347) * y + 117.693950891312499) * y + 537.181101862009858) * y
                + 1621.38957456669019) * y + 3290.79923573345963) * y + 4362.61909014324716) * y
             + 3439.36767414372164) * y + 1230.33935480374942
        out[mid] = 1.0 - np.exp(-y * y) * p / q
    big = ax >= 4.0
    if big.any():
        y = ax[big]
        z = 1.0 / (y * y)
        p = ((((0.0163153871373020978 * z + 0.305326634961232344) * z + 0.360344899949804439) * z
              + 0.125781726111229246) * z + 0.0160837851487422766) * z + 6.58749161529837803e-4
        q = ((((z + 2.56852019228982242) * z + 1.87295284992346725) * z + 0.527905102951428412) * z
             + 0.0605183413124413191) * z + 0.00233520497626869185
        r = (1.0 / math.sqrt(math.pi) - z * p / q) / y
        out[big] = 1.0 - np.exp(-y * y) * r
    return np.sign(x) * out


def _erf32(x: np.ndarray) -> np.ndarray:
    """erf of a float32 array: scipy's float32 kernel where installed (fast), else :func:`_erf`."""
    try:
        from scipy.special import erf as scipy_erf
    except Exception:  # scipy is optional
        return _erf(x).astype(np.float32)
    return scipy_erf(x)


def _with_eps(fn: Callable[[np.ndarray, float], np.ndarray]) -> Kernel:
    def run(c: _Call) -> np.ndarray:
        return fn(c.x(), c.float("epsilon", 1e-12) if c.has("epsilon") else None)
    return run


for _name, _fn in {
    "abs": np.abs, "exp": np.exp, "exp2": np.exp2, "sin": np.sin, "cos": np.cos, "tan": np.tan,
    "tanh": np.tanh, "sinh": np.sinh, "cosh": np.cosh, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "atanh": np.arctanh, "asinh": np.arcsinh, "acosh": np.arccosh, "sqrt": np.sqrt, "square": np.square,
    "sign": np.sign, "floor": np.floor, "ceil": np.ceil, "round": np.round,
    "erf": lambda x: _erf32(x) if x.dtype == np.float32 else _erf(x).astype(x.dtype),
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": lambda x: (1.0 / (1.0 + np.exp(-x))).astype(x.dtype),
    "softsign": lambda x: x / (1 + np.abs(x)), "logical_not": np.logical_not,
    "silu": lambda x: x / (1.0 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0, x).astype(x.dtype),
    "identity": lambda x: x,
}.items():
    KERNELS[_name] = _unary(_fn)

KERNELS["rsqrt"] = _with_eps(lambda x, e: 1.0 / np.sqrt(x + (e if e is not None else 1e-12)))
KERNELS["inverse"] = _with_eps(lambda x, e: 1.0 / (x + (e if e is not None else 1e-4)))
KERNELS["log"] = _with_eps(lambda x, e: np.log(x + (e if e is not None else 1e-45)))


@kernel("gelu")
def _gelu(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    mode = c.str("mode", "EXACT") if c.has("mode") else "EXACT"
    if mode == "EXACT":
        return (0.5 * x * (1.0 + _erf32(x * np.float32(1.0 / math.sqrt(2.0))))).astype(np.float32)
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise InterpreterError(f"gelu '{c.op.name}': unknown mode {mode!r}")


@kernel("clip")
def _clip(c: _Call) -> np.ndarray:
    return np.clip(c.x(), c.float("alpha"), c.float("beta"))


@kernel("leaky_relu")
def _leaky_relu(c: _Call) -> np.ndarray:
    x = c.x()
    return np.where(x >= 0, x, x * c.float("alpha", 0.01)).astype(x.dtype)


@kernel("elu")
def _elu(c: _Call) -> np.ndarray:
    x = c.x()
    return np.where(x > 0, x, c.float("alpha", 1.0) * (np.exp(x) - 1)).astype(x.dtype)


@kernel("prelu")
def _prelu(c: _Call) -> np.ndarray:
    x = c.x()
    alpha = np.asarray(c("alpha")).reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, x * alpha).astype(x.dtype)


@kernel("linear_activation")
def _linear_activation(c: _Call) -> np.ndarray:
    return c.x() * c.float("alpha") + c.float("beta", 0.0)


@kernel("hard_sigmoid")
def _hard_sigmoid(c: _Call) -> np.ndarray:
    return np.clip(c.x() * c.float("alpha", 0.2) + c.float("beta", 0.5), 0, 1)


@kernel("scaled_tanh")
def _scaled_tanh(c: _Call) -> np.ndarray:
    return c.float("alpha", 1.0) * np.tanh(c.x() * c.float("beta", 1.0))


@kernel("threshold")
def _threshold(c: _Call) -> np.ndarray:
    return np.maximum(c.x(), c.float("alpha"))


@kernel("select")
def _select(c: _Call) -> np.ndarray:
    return np.where(np.asarray(c("cond")).astype(bool), c("a"), c("b"))


@kernel("cast")
def _cast(c: _Call) -> np.ndarray:
    target = _CAST_DTYPES.get(c.str("dtype"))
    if target is None:
        raise InterpreterError(f"cast '{c.op.name}': unknown dtype {c.str('dtype')!r}")
    x = c.x()
    if target in _FLOAT_TYPES:
        return x.astype(np.float32)  # fp16 rounding is applied with the output's declared type
    if target == "BOOL":
        return x.astype(bool)
    if x.dtype.kind == "f":
        x = np.trunc(x)
    return x.astype(_DTYPES[target][0])


# -- reductions -----------------------------------------------------------------------------
def _mean(x: np.ndarray, axis: tuple[int, ...] | None, keepdims: bool) -> np.ndarray:
    """Float means accumulate in float64 (then back to the input's type), like Core ML's fp32."""
    if x.dtype.kind != "f":
        return np.mean(x, axis=axis, keepdims=keepdims)
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=np.float64).astype(x.dtype)


def _reduce(fn: Callable[..., np.ndarray]) -> Kernel:
    def run(c: _Call) -> np.ndarray:
        x = c.x()
        axes = c.ints("axes")
        axes_t = None if axes is None else tuple(_axis(a, x.ndim) for a in axes)
        return fn(x, axis=axes_t, keepdims=c.bool("keep_dims", False))
    return run


for _name, _fn in {
    "reduce_mean": lambda x, axis, keepdims: _mean(x, axis, keepdims),
    "reduce_sum": lambda x, axis, keepdims: np.sum(x, axis=axis, keepdims=keepdims),
    "reduce_max": lambda x, axis, keepdims: np.max(x, axis=axis, keepdims=keepdims),
    "reduce_min": lambda x, axis, keepdims: np.min(x, axis=axis, keepdims=keepdims),
    "reduce_prod": lambda x, axis, keepdims: np.prod(x, axis=axis, keepdims=keepdims),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(x * x, axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(x * x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.logaddexp.reduce(x, axis=axis, keepdims=keepdims),
}.items():
    KERNELS[_name] = _reduce(_fn)


@kernel("reduce_argmax", "reduce_argmin")
def _argreduce(c: _Call) -> np.ndarray:
    x = c.x()
    axis = _axis(c.int("axis", -1), x.ndim)
    fn = np.argmax if c.op.type == "reduce_argmax" else np.argmin
    out = fn(x, axis=axis).astype(np.int32)
    return np.expand_dims(out, axis) if c.bool("keep_dims", False) else out


# -- normalisation / activation over axes --------------------------------------------------
@kernel("softmax")
def _softmax(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    axis = c.int("axis", -1)
    e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


@kernel("layer_norm")
def _layer_norm(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    axes = c.ints("axes")
    axes_t = tuple(range(x.ndim)) if axes is None else tuple(sorted(_axis(a, x.ndim) for a in axes))
    mean = x.mean(axis=axes_t, keepdims=True, dtype=np.float64)
    var = ((x - mean) ** 2).mean(axis=axes_t, keepdims=True)
    y = ((x - mean) / np.sqrt(var + c.float("epsilon", 1e-5))).astype(np.float32)
    bshape = [x.shape[i] if i in axes_t else 1 for i in range(x.ndim)]
    if c.has("gamma") and c("gamma") is not None:
        y = y * np.asarray(c("gamma")).reshape(bshape)
    if c.has("beta") and c("beta") is not None:
        y = y + np.asarray(c("beta")).reshape(bshape)
    return y


def _channel_shape(v: Any, rank: int) -> np.ndarray:
    return np.asarray(v).reshape((1, -1) + (1,) * (rank - 2))


@kernel("batch_norm")
def _batch_norm(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    mean = _channel_shape(c("mean"), x.ndim)
    var = _channel_shape(c("variance"), x.ndim)
    y = (x - mean) / np.sqrt(var + c.float("epsilon", 1e-5))
    if c("gamma") is not None:
        y = y * _channel_shape(c("gamma"), x.ndim)
    if c("beta") is not None:
        y = y + _channel_shape(c("beta"), x.ndim)
    return y


@kernel("instance_norm")
def _instance_norm(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + c.float("epsilon", 1e-5))
    if c("gamma") is not None:
        y = y * _channel_shape(c("gamma"), x.ndim)
    if c("beta") is not None:
        y = y + _channel_shape(c("beta"), x.ndim)
    return y


@kernel("l2_norm")
def _l2_norm(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    axes = tuple(range(-3, 0)) if c("axes") is None else tuple(c.ints("axes"))
    norm = np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
    return x / np.maximum(norm, c.float("epsilon", 1e-6))


# -- linear algebra ----------------------------------------------------------------------------
@kernel("matmul")
def _matmul(c: _Call) -> np.ndarray:
    x, y = _f32(c("x")), _f32(c("y"))
    if c.bool("transpose_x") and x.ndim >= 2:
        x = np.ascontiguousarray(np.swapaxes(x, -1, -2))
    if c.bool("transpose_y") and y.ndim >= 2:
        y = np.ascontiguousarray(np.swapaxes(y, -1, -2))
    return np.matmul(x, y)


@kernel("linear")
def _linear(c: _Call) -> np.ndarray:
    out = np.matmul(_f32(c.x()), _f32(c("weight")).T)
    return out + c("bias") if c("bias") is not None else out


@kernel("einsum")
def _einsum(c: _Call) -> np.ndarray:
    return np.einsum(c.str("equation"), *[_f32(v) for v in c.list("values")])


@kernel("scaled_dot_product_attention")
def _sdpa(c: _Call) -> np.ndarray:
    q, k, v = _f32(c("query")), _f32(c("key")), _f32(c("value"))
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    mask = c("attn_mask")
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q = np.broadcast_to(q, batch + q.shape[-2:]).reshape((-1,) + q.shape[-2:])
    kt = np.swapaxes(np.broadcast_to(k, batch + k.shape[-2:]), -1, -2)
    kt = np.ascontiguousarray(kt).reshape((-1, k.shape[-1], k.shape[-2]))
    v = np.ascontiguousarray(np.broadcast_to(v, batch + v.shape[-2:])).reshape((-1,) + v.shape[-2:])
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            mask = np.where(mask, np.float32(0), np.float32(-np.inf))
        scores_shape = (q.shape[-2], kt.shape[-1])
        mask = np.broadcast_to(mask.astype(np.float32), batch + scores_shape).reshape((-1,) + scores_shape)
    out = np.empty((q.shape[0], q.shape[1], v.shape[-1]), np.float32)
    scores = np.empty((q.shape[1], kt.shape[-1]), np.float32)
    # One (L, S) score matrix at a time: it stays in cache, unlike a (B*heads, L, S) tensor.
    for b in range(q.shape[0]):
        np.matmul(q[b], kt[b], out=scores)
        scores *= scale
        if mask is not None:
            scores += mask[b]
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        np.matmul(scores, v[b], out=out[b])
    return out.reshape(batch + out.shape[-2:])


# -- convolution -------------------------------------------------------------------------------
def _conv_padding(c: _Call, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int],
                  dilations: list[int]) -> list[tuple[int, int]]:
    pad_type = c.str("pad_type", "valid") if c.has("pad_type") else "valid"
    n = len(spatial)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = c.ints("pad") or [0] * (2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise InterpreterError(f"conv '{c.op.name}': unknown pad_type {pad_type!r}")


@kernel("conv")
def _conv(c: _Call) -> np.ndarray:
    x, w = _f32(c.x()), _f32(c("weight"))
    n_sp = x.ndim - 2
    if n_sp not in (1, 2, 3):
        raise InterpreterError(f"conv '{c.op.name}': rank-{x.ndim} input is not supported")
    strides = c.ints("strides") or [1] * n_sp
    dilations = c.ints("dilations") or [1] * n_sp
    groups = c.int("groups", 1) if c.has("groups") else 1
    ksize = tuple(w.shape[2:])
    pads = _conv_padding(c, tuple(x.shape[2:]), ksize, strides, dilations)
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0)] + pads)
    batch, cin = x.shape[:2]
    cout = w.shape[0]
    if cin != w.shape[1] * groups:
        raise InterpreterError(
            f"conv '{c.op.name}': input has {cin} channels, weight {tuple(w.shape)} with groups={groups} expects "
            f"{w.shape[1] * groups}")
    sp = x.shape[2:]
    out_sp = tuple((s - (k - 1) * d - 1) // st + 1 for s, k, d, st in zip(sp, ksize, dilations, strides))
    # Promote to 2-D spatial for one code path.
    if n_sp == 1:
        x, w = x[:, :, None], w[:, :, None]
        ksize, strides, dilations, out_sp2 = (1,) + ksize, [1] + strides, [1] + dilations, (1,) + out_sp
    elif n_sp == 2:
        out_sp2 = out_sp
    else:
        return _conv3d(c, x, w, groups, strides, dilations, out_sp)
    oh, ow = out_sp2
    kh, kw = ksize
    sh, sw = strides
    dh, dw = dilations
    cin_g, cout_g = cin // groups, cout // groups
    depthwise = cin_g == 1 and cout_g == 1
    out = np.zeros((batch, cout, oh, ow), dtype=np.float32)
    if depthwise:
        for i in range(kh):
            for j in range(kw):
                patch = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
                out += patch * w[None, :, 0, i, j, None, None]
    elif groups == 1:
        # One matmul per row of taps: (Cout, Cin*kw) @ (Cin*kw, oh*ow), with contiguous operands
        # (numpy's matmul leaves BLAS for strided views).
        wt = np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(kh, cout, cin * kw)
        flat = out.reshape(batch, cout, oh * ow)
        for i in range(kh):
            rows = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh]
            cols = np.stack([rows[..., j * dw: j * dw + (ow - 1) * sw + 1: sw] for j in range(kw)], axis=2)
            cols = cols.reshape(batch, cin * kw, oh * ow)
            for b in range(batch):
                flat[b] += wt[i] @ cols[b]
    else:
        wg = np.ascontiguousarray(w.reshape(groups, cout_g, cin_g, kh, kw).transpose(3, 4, 0, 1, 2))
        out_g = out.reshape(batch, groups, cout_g, oh * ow)
        for i in range(kh):
            for j in range(kw):
                patch = x[:, :, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw]
                patch = np.ascontiguousarray(patch).reshape(batch, groups, cin_g, oh * ow)
                for b in range(batch):
                    for g in range(groups):
                        out_g[b, g] += wg[i, j, g] @ patch[b, g]
        out = out_g.reshape(batch, cout, oh, ow)
    bias = c("bias")
    if bias is not None:
        out += np.asarray(bias, dtype=np.float32)[None, :, None, None]
    return out[:, :, 0] if n_sp == 1 else out


def _conv3d(c, x, w, groups, strides, dilations, out_sp):  # rarely used; straightforward loops
    batch, cin = x.shape[:2]
    cout = w.shape[0]
    cin_g, cout_g = cin // groups, cout // groups
    od, oh, ow = out_sp
    kd, kh, kw = w.shape[2:]
    out = np.zeros((batch, groups, cout_g, od * oh * ow), dtype=np.float32)
    wg = w.reshape(groups, cout_g, cin_g, kd, kh, kw)
    for a in range(kd):
        for i in range(kh):
            for j in range(kw):
                patch = x[:, :, a * dilations[0]: a * dilations[0] + (od - 1) * strides[0] + 1: strides[0],
                          i * dilations[1]: i * dilations[1] + (oh - 1) * strides[1] + 1: strides[1],
                          j * dilations[2]: j * dilations[2] + (ow - 1) * strides[2] + 1: strides[2]]
                patch = np.ascontiguousarray(patch).reshape(batch, groups, cin_g, -1)
                out += np.matmul(wg[None, :, :, :, a, i, j], patch)
    out = out.reshape(batch, cout, od, oh, ow)
    bias = c("bias")
    if bias is not None:
        out += np.asarray(bias, dtype=np.float32)[None, :, None, None, None]
    return out


# -- pooling -------------------------------------------------------------------------------------
@kernel("avg_pool", "max_pool")
def _pool(c: _Call) -> np.ndarray:
    x = _f32(c.x())
    if x.ndim != 4:
        raise InterpreterError(f"{c.op.type} '{c.op.name}': only 2-D pooling is supported")
    ksize = tuple(c.ints("kernel_sizes"))
    strides = c.ints("strides") or [1, 1]
    pads = _conv_padding(c, tuple(x.shape[2:]), ksize, strides, [1, 1])
    is_max = c.op.type == "max_pool"
    fill = -np.inf if is_max else 0.0
    xp = np.pad(x, [(0, 0), (0, 0)] + pads, constant_values=fill)
    ones = np.pad(np.ones(x.shape[2:], np.float32), pads)
    oh = (xp.shape[2] - ksize[0]) // strides[0] + 1
    ow = (xp.shape[3] - ksize[1]) // strides[1] + 1
    acc = np.full(x.shape[:2] + (oh, ow), fill, np.float32)
    cnt = np.zeros((oh, ow), np.float32)
    for i in range(ksize[0]):
        for j in range(ksize[1]):
            sl = (slice(i, i + (oh - 1) * strides[0] + 1, strides[0]),
                  slice(j, j + (ow - 1) * strides[1] + 1, strides[1]))
            patch = xp[(slice(None), slice(None)) + sl]
            acc = np.maximum(acc, patch) if is_max else acc + patch
            cnt += ones[sl]
    if is_max:
        return acc
    exclude = c.bool("exclude_padding_from_average", False)
    return acc / (cnt if exclude else float(ksize[0] * ksize[1]))


# -- shape manipulation -----------------------------------------------------------------------------
@kernel("reshape")
def _reshape(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    shape = c.ints("shape")
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def _transpose(c: _Call) -> np.ndarray:
    return np.transpose(c.x(), c.ints("perm"))


@kernel("expand_dims")
def _expand_dims(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    axes = c.ints("axes")
    out_rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(_axis(a, out_rank) for a in axes)))


@kernel("squeeze")
def _squeeze(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    axes = c.ints("axes")
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, tuple(_axis(a, x.ndim) for a in axes))


@kernel("tile")
def _tile(c: _Call) -> np.ndarray:
    return np.tile(np.asarray(c("x")), c.ints("reps"))


@kernel("concat")
def _concat(c: _Call) -> np.ndarray:
    values = [np.asarray(v) for v in c.list("values")]
    if any(v.ndim == 0 for v in values):  # scalars concatenate as 1-element vectors (shape math)
        values = [np.atleast_1d(v) for v in values]
    axis = _axis(c.int("axis"), values[0].ndim)
    if c.bool("interleave", False):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@kernel("stack")
def _stack(c: _Call) -> np.ndarray:
    values = [np.asarray(v) for v in c.list("values")]
    return np.stack(values, axis=_axis(c.int("axis"), values[0].ndim + 1))


@kernel("split")
def _split(c: _Call) -> list[np.ndarray]:
    x = np.asarray(c("x"))
    axis = _axis(c.int("axis"), x.ndim)
    sizes = c.ints("split_sizes")
    if sizes is None:
        n = c.int("num_splits")
        sizes = [x.shape[axis] // n] * n
    bounds = np.cumsum(sizes)[:-1]
    return np.split(x, bounds, axis=axis)


@kernel("slice_by_index")
def _slice_by_index(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    rank = x.ndim
    begin = c.ints("begin")
    end = c.ints("end")
    stride = c.ints("stride") or [1] * rank
    bmask = [bool(b) for b in np.asarray(c("begin_mask", [False] * rank)).reshape(-1)]
    emask = [bool(b) for b in np.asarray(c("end_mask", [False] * rank)).reshape(-1)]
    smask = [bool(b) for b in np.asarray(c("squeeze_mask", [False] * rank)).reshape(-1)]
    index: list[Any] = []
    for i in range(rank):
        if smask[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if bmask[i] else begin[i], None if emask[i] else end[i], stride[i]))
    return x[tuple(index)]


@kernel("slice_by_size")
def _slice_by_size(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    begin = c.ints("begin")
    size = c.ints("size")
    index = []
    for i, (b, s) in enumerate(zip(begin, size)):
        b = _axis(b, x.shape[i])
        index.append(slice(b, None if s == -1 else b + s))
    return x[tuple(index)]


@kernel("gather")
def _gather(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    indices = np.asarray(c("indices")).astype(np.int64)
    axis = _axis(c.int("axis", 0), x.ndim)
    batch_dims = c.int("batch_dims", 0) if c.has("batch_dims") else 0
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    if indices.size and (indices.min() < 0 or indices.max() >= x.shape[axis]):
        raise InterpreterError(f"gather '{c.op.name}': index out of range for axis size {x.shape[axis]}")
    if batch_dims == 0:
        return np.take(x, indices, axis=axis)
    # Batched gather: loop over the shared leading dims.
    lead = x.shape[:batch_dims]
    xs = x.reshape((-1,) + x.shape[batch_dims:])
    ids = indices.reshape((-1,) + indices.shape[batch_dims:])
    outs = [np.take(xs[b], ids[b], axis=axis - batch_dims) for b in range(xs.shape[0])]
    return np.stack(outs).reshape(lead + outs[0].shape)


@kernel("gather_along_axis")
def _gather_along_axis(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    axis = _axis(c.int("axis", 0), x.ndim)
    indices = np.asarray(c("indices")).astype(np.int64)
    indices = np.where(indices < 0, indices + x.shape[axis], indices)
    return np.take_along_axis(x, indices, axis=axis)


@kernel("gather_nd")
def _gather_nd(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    indices = np.asarray(c("indices")).astype(np.int64)
    k = indices.shape[-1]
    flat = indices.reshape(-1, k)
    out = x[tuple(flat[:, i] for i in range(k))]
    return out.reshape(indices.shape[:-1] + x.shape[k:])


@kernel("pad")
def _pad(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    pad = c.ints("pad")
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = c.str("mode", "constant") if c.has("mode") else "constant"
    if mode == "constant":
        return np.pad(x, widths, constant_values=c.float("constant_val", 0.0) if c.has("constant_val") else 0.0)
    if mode == "reflect":
        for axis, (before, after) in enumerate(widths):
            if max(before, after) >= x.shape[axis] and (before or after):
                raise InterpreterError(
                    f"pad '{c.op.name}': reflect padding of {max(before, after)} on an axis of size "
                    f"{x.shape[axis]} (Core ML needs pad < size)")
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    if mode == "symmetric":
        return np.pad(x, widths, mode="symmetric")
    raise InterpreterError(f"pad '{c.op.name}': unknown mode {mode!r}")


@kernel("pixel_shuffle")
def _pixel_shuffle(c: _Call) -> np.ndarray:
    x = c.x()
    r = c.int("upscale_factor")
    b, ch, h, w = x.shape
    oc = ch // (r * r)
    return x.reshape(b, oc, r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, oc, h * r, w * r)


@kernel("pixel_unshuffle")
def _pixel_unshuffle(c: _Call) -> np.ndarray:
    x = c.x()
    r = c.int("downscale_factor")
    b, ch, h, w = x.shape
    return x.reshape(b, ch, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(b, ch * r * r, h // r, w // r)


@kernel("upsample_nearest_neighbor")
def _upsample_nearest(c: _Call) -> np.ndarray:
    x = c.x()
    sh = c.float("scale_factor_height", 1.0)
    sw = c.float("scale_factor_width", 1.0)
    h, w = x.shape[-2:]
    oh, ow = int(math.floor(h * sh)), int(math.floor(w * sw))
    rows = np.minimum(np.floor(np.arange(oh) / sh).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(ow) / sw).astype(np.int64), w - 1)
    return x[..., rows, :][..., cols]


@kernel("shape")
def _shape(c: _Call) -> np.ndarray:
    return np.array(np.asarray(c("x")).shape, dtype=np.int32)


@kernel("range_1d")
def _range_1d(c: _Call) -> np.ndarray:
    start, end, step = (np.asarray(c(k)).reshape(()) for k in ("start", "end", "step"))
    return np.arange(start, end, step)


@kernel("fill")
def _fill(c: _Call) -> np.ndarray:
    value = np.asarray(c("value", 0.0))
    return np.full(c.ints("shape"), value, dtype=value.dtype)


@kernel("fill_like")
def _fill_like(c: _Call) -> np.ndarray:
    value = np.asarray(c("value", 0.0))
    return np.full(np.asarray(c("ref_tensor")).shape, value, dtype=value.dtype)


@kernel("band_part")
def _band_part(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    lower, upper = c.int("lower", -1), c.int("upper", -1)
    m, n = x.shape[-2:]
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    keep = ((lower < 0) | (i - j <= lower)) & ((upper < 0) | (j - i <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@kernel("cumsum")
def _cumsum(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    axis = c.int("axis", 0)
    if c.bool("reverse"):
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis)
    if c.bool("exclusive"):
        out = out - x
    return np.flip(out, axis) if c.bool("reverse") else out


@kernel("reverse")
def _reverse(c: _Call) -> np.ndarray:
    x = np.asarray(c("x"))
    axes = c.ints("axes")
    return np.flip(x, axis=None if axes is None else tuple(axes))


# -- compile-time (constexpr) weight decompression --------------------------------------------
def _broadcast_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter (same rank as ``shape``) up to ``shape``."""
    out = np.asarray(param)
    for axis, (size, n) in enumerate(zip(shape, out.shape)):
        if n != size:
            out = np.repeat(out, size // n, axis=axis)
    return out


@kernel("constexpr_affine_dequantize")
def _affine_dequantize(c: _Call) -> np.ndarray:
    data = np.asarray(c("quantized_data")).astype(np.float32)
    zero = np.asarray(c("zero_point")).astype(np.float32)
    scale = np.asarray(c("scale")).astype(np.float32)
    axis = _axis(c.int("axis", 0), data.ndim)
    shape = [1] * data.ndim
    if scale.size > 1:
        shape[axis] = -1
        scale = scale.reshape(shape)
    if zero.size > 1:
        shape[axis] = -1
        zero = zero.reshape(shape)
    return scale * (data - zero)


@kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(c: _Call) -> np.ndarray:
    data = np.asarray(c("data")).astype(np.float32)
    scale = _broadcast_blocks(np.asarray(c("scale")).astype(np.float32), data.shape)
    offset = c("offset")
    if offset is not None:
        data = data - _broadcast_blocks(np.asarray(offset).astype(np.float32), data.shape)
    return scale * data


@kernel("constexpr_lut_to_dense")
def _lut_to_dense(c: _Call) -> np.ndarray:
    lut = np.asarray(c("lut"))
    if c.has("shape"):  # iOS16: flat LUT, packed uint8 indices, output shape
        shape = tuple(c.ints("shape"))
        nbits = int(round(math.log2(lut.shape[0])))
        count = int(np.prod(shape))
        indices = _unpack_bits(np.asarray(c("indices")), nbits, count, signed=False).astype(np.int64)
        return lut[indices].reshape(shape)
    # iOS18: indices already unpacked (sub-byte dtype), LUT of rank K + 2 (per-block tables,
    # palette size, vector size).
    indices = np.asarray(c("indices")).astype(np.int64)
    k = indices.ndim
    vector = lut.shape[-1]
    out_shape = list(indices.shape)
    if vector == 1:
        tables = [lut.shape[i] for i in range(k)]
        block = [indices.shape[i] // tables[i] for i in range(k)]
        grid = np.meshgrid(*[np.arange(s) // b for s, b in zip(indices.shape, block)], indexing="ij")
        return lut[tuple(grid) + (indices, 0)]
    axis = _axis(c.int("vector_axis", 0), k)
    tables = [lut.shape[i] for i in range(k)]
    block = [indices.shape[i] // tables[i] for i in range(k)]
    grid = np.meshgrid(*[np.arange(s) // b for s, b in zip(indices.shape, block)], indexing="ij")
    vectors = lut[tuple(grid) + (indices,)]  # indices.shape + (vector,)
    vectors = np.moveaxis(vectors, -1, axis + 1)
    out_shape[axis] *= vector
    return vectors.reshape(out_shape)


@kernel("constexpr_cast")
def _constexpr_cast(c: _Call) -> np.ndarray:
    return np.asarray(c("source_val")).astype(np.float32)


@kernel("constexpr_sparse_to_dense")
def _sparse_to_dense(c: _Call) -> np.ndarray:
    nonzero = np.asarray(c("nonzero_data"))
    mask = np.asarray(c("mask"))
    if c.has("shape"):
        shape = tuple(c.ints("shape"))
        bits = _unpack_bits(mask, 1, int(np.prod(shape)), signed=False).astype(bool)
    else:
        shape, bits = mask.shape, mask.astype(bool).reshape(-1)
    out = np.zeros(int(np.prod(shape)), dtype=nonzero.dtype)
    out[bits.reshape(-1)] = nonzero.reshape(-1)
    return out.reshape(shape)


COMPILE_TIME_OPS = frozenset(name for name in KERNELS if name.startswith("constexpr_"))


# --------------------------------------------------------------------------------------
# Interpreter
# --------------------------------------------------------------------------------------
def _round16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest float16 (ties to even), kept as float32.

    Bit-exact with ``a.astype(np.float16).astype(np.float32)`` (overflow to inf, fp16
    subnormals, NaN included) and several times faster: the float32 mantissa is rounded
    to 10 bits with integer arithmetic; values below fp16's normal range (2**-14) are
    rounded to multiples of 2**-24, magnitudes above 65504 become infinities.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    r = np.empty_like(a)
    rv = r.view(np.uint32)
    np.right_shift(u, np.uint32(13), out=rv)
    np.bitwise_and(rv, np.uint32(1), out=rv)
    np.add(rv, np.uint32(0x0FFF), out=rv)
    np.add(rv, u, out=rv)
    np.bitwise_and(rv, np.uint32(0xFFFFE000), out=rv)
    if a.size == 0:
        return r
    mag = np.bitwise_and(u, np.uint32(0x7FFFFFFF))
    if mag.min() < np.uint32(0x38800000):  # |a| < 2**-14: fp16 subnormal range
        small = mag < np.uint32(0x38800000)
        r[small] = np.round(a[small] * np.float32(16777216.0)) / np.float32(16777216.0)
    np.bitwise_and(rv, np.uint32(0x7FFFFFFF), out=mag)
    if mag.max() > np.uint32(0x477FE000):  # above 65504 after rounding (NaN excluded below)
        big = (mag > np.uint32(0x477FE000)) & (mag <= np.uint32(0x7F800000))
        r[big] = np.copysign(np.float32(np.inf), a[big])
    return r


@dataclass
class OpStat:
    seconds: float = 0.0
    count: int = 0


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
                f"add a kernel to runtimes/coreml_interpreter.py (KERNELS) or execute the package with "
                f"Core ML on macOS.")
        self._constants: dict[str, Any] = {}
        self._runtime_ops: list[MILOp] = []
        self._load_constants()
        self.stats: dict[str, OpStat] = {}

    # -- constants ----------------------------------------------------------------------
    def _store(self, var: MILVar, value: Any) -> Any:
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            value = value.astype(np.float32)  # keep stored fp16 values exactly, as float32
        return value

    def _load_constants(self) -> None:
        for op in self.program.ops:
            if op.type == "const":
                val = self._store(op.outputs[0], op.attributes.get("val"))
                if self.precision == "fp16" and isinstance(val, np.ndarray) and val.dtype == np.float32:
                    val = _round16(val)  # an fp32 package's weights, as an fp16 device holds them
                self._constants[op.outputs[0].name] = val
            elif op.type in COMPILE_TIME_OPS:
                call = _Call(op, self._constants)
                result = KERNELS[op.type](call)
                self._constants[op.outputs[0].name] = self._finish(op.outputs[0], np.asarray(result), constant=True)
            else:
                self._runtime_ops.append(op)

    # -- execution ----------------------------------------------------------------------
    def _finish(self, var: MILVar, value: Any, constant: bool = False) -> Any:
        if not isinstance(value, np.ndarray):
            value = np.asarray(value)
        dtype = var.dtype
        if dtype in _FLOAT_TYPES:
            if value.dtype != np.float32:
                value = value.astype(np.float32)
            if self.precision == "fp16" or (self.precision == "auto" and dtype == "FLOAT16"):
                value = _round16(value)
        elif dtype == "BOOL":
            value = value.astype(bool)
        elif dtype in _DTYPES and dtype != "STRING" and value.dtype.kind in "fiub":
            target = _DTYPES[dtype][0]
            if value.dtype != target:
                if value.dtype.kind == "f":
                    value = np.trunc(value)
                value = value.astype(target)
        if var.shape is not None and None not in var.shape and value.shape != var.shape and not constant:
            raise InterpreterError(
                f"'{var.name}' has shape {value.shape}, the program declares {var.shape}: the interpreter "
                f"and the package disagree (an interpreter bug, or an input of the wrong size)")
        return value

    def run(self, inputs: dict[str, np.ndarray], trace: Callable[[MILOp, list[Any], dict[str, Any]], None] | None = None,
            profile: bool = False) -> dict[str, np.ndarray]:
        """Run the program on named inputs; returns the named outputs.

        ``trace(op, outputs, env)`` is called after every run-time op (checks, debugging);
        ``profile=True`` accumulates seconds per op type in :attr:`stats`.
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
            env[var.name] = self._finish(MILVar(var.name, var.dtype, None), value)
        for op in self._runtime_ops:
            fn = KERNELS[op.type]
            start = time.perf_counter() if profile else 0.0
            try:
                result = fn(_Call(op, env))
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
            if profile:
                stat = self.stats.setdefault(op.type, OpStat())
                stat.seconds += time.perf_counter() - start
                stat.count += 1
            if trace is not None:
                trace(op, [env[o.name] for o in op.outputs], env)
        return {name: env[name] for name in self.program.outputs}

    @property
    def input_name(self) -> str:
        return self.program.inputs[0].name

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Single-input, single-output convenience: the program's first output for ``x``."""
        out = self.run({self.input_name: np.asarray(x, dtype=np.float32)})
        return out[self.program.outputs[0]]

    __call__ = predict
