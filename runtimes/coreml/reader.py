"""Read a Core ML ML program package (``.mlpackage`` / ``.mlmodel``) the way Core ML does.

Why our own reader: Core ML prediction runs only on macOS, so on Linux nothing would
ever look at the program ``export/to_coreml.py`` writes. Here:

* ``Data/com.apple.CoreML/model.mlmodel`` is parsed with coremltools' protobuf classes
  (``coremltools.proto.Model_pb2``); the program is ``model.mlProgram``, whose ``main``
  function holds one block of operations in execution order;
* constants stored in ``weights/weight.bin`` are read with coremltools' blob reader
  (``coremltools.libmilstoragepython``) or, where that native module is missing, by
  parsing the documented blob layout (64-byte storage header, then for every blob a
  64-byte metadata record ``sentinel 0xDEADBEEF, dtype, size, data offset`` and the data).
"""
from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.errors import ESCError

__all__ = [
    "ArgRef", "BlobFile", "InterpreterError", "MILOp", "MILProgram", "MILVar", "UnsupportedOpError",
    "DTYPES", "FLOAT_TYPES", "load_program", "unpack_bits",
]

DATA_DIR = Path("Data") / "com.apple.CoreML"


class InterpreterError(ESCError, RuntimeError):
    """The package cannot be read or executed."""


class UnsupportedOpError(InterpreterError):
    """The program contains an operation the interpreter does not implement."""


# MIL data types (MIL.proto's DataType enum) -> (numpy dtype of the decoded value, bits).
DTYPES: dict[str, tuple[Any, int]] = {
    "BOOL": (np.bool_, 8), "FLOAT16": (np.float16, 16), "FLOAT32": (np.float32, 32),
    "FLOAT64": (np.float64, 64), "INT8": (np.int8, 8), "INT16": (np.int16, 16), "INT32": (np.int32, 32),
    "INT64": (np.int64, 64), "UINT8": (np.uint8, 8), "UINT16": (np.uint16, 16), "UINT32": (np.uint32, 32),
    "UINT64": (np.uint64, 64), "INT4": (np.int8, 4), "UINT4": (np.uint8, 4), "UINT1": (np.uint8, 1),
    "UINT2": (np.uint8, 2), "UINT3": (np.uint8, 3), "UINT6": (np.uint8, 6), "STRING": (object, 0),
}
FLOAT_TYPES = ("FLOAT16", "FLOAT32", "FLOAT64")
_SUB_BYTE = ("INT4", "UINT4", "UINT1", "UINT2", "UINT3", "UINT6")
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
    """The ``main`` function of an ML program package, constants decoded."""

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
        """This function's inputs and outputs: its own entry in a multifunction package (whose
        model-level description lists none), else the model's description."""
        for func in self.spec.description.functions:
            if func.name == self.function:
                return func
        return self.spec.description

    @property
    def functions(self) -> list[str]:
        """Every function of the package (``[function]`` for a single-function one)."""
        return [f.name for f in self.spec.description.functions] or [self.function]

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.spec.description.metadata.userDefined)

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


    def histogram(self, include_const: bool = False) -> Counter:
        """Operation counts by type (``const`` left out unless asked for)."""
        return Counter(op.type for op in self.ops if include_const or op.type != "const")

    def input_shapes(self) -> list[tuple[int, int]]:
        """The (H, W) input sizes the package declares: one for a fixed shape, several for
        enumerated shapes, [] for a shape range (any size in it)."""
        feature = self.description.input[0]
        kind = feature.type.WhichOneof("Type")
        if kind == "multiArrayType":
            arr = feature.type.multiArrayType
            flexibility = arr.WhichOneof("ShapeFlexibility")
            if flexibility == "enumeratedShapes":
                return [(int(s.shape[2]), int(s.shape[3])) for s in arr.enumeratedShapes.shapes]
            if flexibility is None and len(arr.shape) == 4:
                return [(int(arr.shape[2]), int(arr.shape[3]))]
            return []
        if kind == "imageType":
            img = feature.type.imageType
            if img.WhichOneof("SizeFlexibility") == "enumeratedSizes":
                return [(int(s.height), int(s.width)) for s in img.enumeratedSizes.sizes]
            return [(int(img.height), int(img.width))]
        raise InterpreterError(f"{self.path}: input {feature.name} is a {kind}; an image or multi-array expected")


def _proto_modules() -> tuple[Any, Any]:
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


def unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    """Unpack ``count`` ``nbits``-wide fields packed LSB-first into bytes (MIL's layout)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8).reshape(-1), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.int32)
    values = (bits << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
    return values.astype(np.int8 if signed else np.uint8)


class BlobFile:
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
        np_dtype, bits = DTYPES[dtype]
        if dtype in _SUB_BYTE:
            return unpack_bits(raw, bits, count, signed=dtype == "INT4")
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
    np_dtype, bits = DTYPES[dtype]
    count = int(np.prod(shape)) if shape else 1
    if kind == "bytes":
        raw = np.frombuffer(values[0] if values else b"", dtype=np.uint8)
        if dtype in _SUB_BYTE:
            arr = unpack_bits(raw, bits, count, signed=dtype == "INT4")
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
        listed = [f.name for f in spec.description.functions] or sorted(prog.functions)
        raise InterpreterError(f"{root}: no function {function!r}; the package has {', '.join(listed)} "
                               f"(pass one of them as function=)")
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
    blob_files: dict[str, BlobFile] = {}

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
                blob = blob_files[file_name] = BlobFile(blob_path)
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

