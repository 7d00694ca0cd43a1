"""The smallest stand-in for TensorRT's compiled core (``tensorrt.so``) under NVIDIA's real ``tensorrt.plugin``.

The TensorRT bindings wheels carry ``tensorrt.plugin`` (QDP) as plain Python over a
pybind11 module that needs libnvinfer. :mod:`trt_real` stages this file as
``tensorrt/__init__.py`` beside the wheel's own ``plugin/`` package, so the project's plugin
runs through NVIDIA's registration, validation, creator and plugin classes of each version.
What is here is only what ``tensorrt.plugin`` and the parser/builder driver
(``trt_qdp_driver.py``) touch, and it refuses what the real classes refuse (facts from the
10.13 ``.pyi`` stubs, the 11.4 ``tensorrt.so`` strings and NVIDIA's ``pyPlugin.cpp``):

* shapes are ``IDimensionExpr`` trees built by an ``IExprBuilder`` (no Python ints where
  TensorRT hands expressions; ``operation`` takes expressions only);
* enums are not ints (``DataType.HALF != 1``), ``PluginField`` needs a buffer and reads it
  back by its declared type (``data`` of an INT32 field is an int32 array of ``length``);
* ``ISymExpr``'s ``type``/``dtype``/``expr`` are write-only; ``KernelLaunchParams`` and
  ``ISymExprs`` (made by TensorRT, never by Python) take only complete ``ISymExpr``s;
* classes have no attributes beyond the real ones (``__slots__``).

``IDimensionExpr._evaluate`` (not TensorRT API) lets the driver evaluate the expressions
at concrete shapes, as TensorRT does at run time. Never on any path outside the tests.
"""
import enum
import sys

import numpy as np

__version__ = "shim"   # overwritten by trt_real.stage() with the wheel's version


class _Enum(enum.Enum):
    """pybind11 enum semantics: named, hashable, ``int()``-able, not equal to ints."""

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value


def _enum(name: str, members: dict) -> type:
    return _Enum(name, members)


DataType = _enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "FP8": 6,
                              "BF16": 7, "INT64": 8, "INT4": 9, "FP4": 10, "E8M0": 11})
float32, float16, int8, int32, bool, uint8, fp8, bfloat16, int64, int4, fp4 = (  # noqa: A001 (TensorRT's names)
    DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.BOOL, DataType.UINT8, DataType.FP8,
    DataType.BF16, DataType.INT64, DataType.INT4, DataType.FP4)
TensorFormat = _enum("TensorFormat", {"LINEAR": 0, "CHW2": 1, "HWC8": 2, "CHW4": 3, "CHW16": 4, "CHW32": 5})
PluginFieldType = _enum("PluginFieldType", {"FLOAT16": 0, "FLOAT32": 1, "FLOAT64": 2, "INT8": 3, "INT16": 4,
                                            "INT32": 5, "CHAR": 6, "DIMS": 7, "UNKNOWN": 8, "BF16": 9, "INT64": 10,
                                            "FP8": 11, "INT4": 12, "FP4": 13})
DimensionOperation = _enum("DimensionOperation", {"SUM": 0, "PROD": 1, "MAX": 2, "MIN": 3, "SUB": 4, "EQUAL": 5,
                                                  "LESS": 6, "FLOOR_DIV": 7, "CEIL_DIV": 8})
TensorRTPhase = _enum("TensorRTPhase", {"BUILD": 0, "RUNTIME": 1})
QuickPluginCreationRequest = _enum("QuickPluginCreationRequest", {"UNKNOWN": 0, "PREFER_JIT": 1, "PREFER_AOT": 2,
                                                                  "STRICT_JIT": 3, "STRICT_AOT": 4})
PluginArgType = _enum("PluginArgType", {"INT": 0})
PluginArgDataType = _enum("PluginArgDataType", {"INT8": 0, "INT16": 1, "INT32": 2})


def _int_arg(value, what: str) -> int:
    """pybind11's int conversion: ints and objects with ``__index__`` (numpy ints), never floats."""
    if isinstance(value, float) or not hasattr(value, "__index__"):
        raise TypeError(f"{what}: incompatible function arguments, got {type(value).__name__} (expected int)")
    return int(value)


def _index(items, index: int) -> int:
    """``index`` if it is in range of ``items`` (pybind11's bound vectors: no negative indices), else IndexError."""
    if not 0 <= index < len(items):
        raise IndexError(index)
    return index


def _need(value, kind, what: str):
    if not isinstance(value, kind):
        raise TypeError(f"{what}: incompatible function arguments, got {type(value).__name__} (expected {kind})")
    return value


# -- logging ----------------------------------------------------------------------------------------
class ILogger:
    Severity = _enum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})


class Logger(ILogger):
    __slots__ = ("min_severity",)

    def __init__(self, min_severity=ILogger.Severity.WARNING) -> None:
        self.min_severity = _need(min_severity, ILogger.Severity, "Logger()")

    def log(self, severity, msg: str) -> None:
        if _need(severity, ILogger.Severity, "Logger.log").value <= self.min_severity.value:
            print(f"[TRT shim] [{severity.name[0]}] {_need(msg, str, 'Logger.log')}", file=sys.stderr)


for _severity in ILogger.Severity:
    setattr(Logger, _severity.name, _severity)


# -- plugin fields ---------------------------------------------------------------------------------------
_FIELD_DTYPES = {PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
                 PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32,
                 PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8}


class PluginField:
    """``name``, a buffer and its element type; ``size`` is the buffer's element count (pyPlugin.cpp)."""

    __slots__ = ("_name", "_bytes", "type", "size")

    def __init__(self, name: str = "", data=None, type=PluginFieldType.UNKNOWN) -> None:  # noqa: A002
        self._name = _need(name, str, "PluginField(name)")
        self.type = _need(type, PluginFieldType, "PluginField(type)")
        if data is None:
            self._bytes, self.size = b"", 0
        else:
            view = memoryview(data)   # TypeError for anything without the buffer protocol (a str)
            self._bytes, self.size = view.tobytes(), view.nbytes // max(view.itemsize, 1)

    @property
    def name(self) -> str:
        return self._name

    @property
    def data(self) -> np.ndarray:
        if self.type not in _FIELD_DTYPES:
            raise AttributeError("No known conversion for returning data from PluginField")
        return np.frombuffer(self._bytes, dtype=_FIELD_DTYPES[self.type], count=self.size).copy()


class PluginFieldCollection(list):
    """The Python-side vector of fields (``trt.PluginFieldCollection([...])``)."""

    def __init__(self, fields=()) -> None:
        super().__init__(_need(f, PluginField, "PluginFieldCollection") for f in fields)

    def append(self, field) -> None:
        super().append(_need(field, PluginField, "PluginFieldCollection.append"))


class PluginFieldCollection_:  # noqa: N801 (TensorRT's name)
    """The C struct TensorRT hands ``create_plugin``: length and indexing only."""

    __slots__ = ("_fields",)

    def __init__(self, fields) -> None:
        self._fields = tuple(_need(fields, PluginFieldCollection, "PluginFieldCollection_"))

    def __len__(self) -> int:
        return len(self._fields)

    def __getitem__(self, index: int) -> PluginField:
        return self._fields[_index(self._fields, index)]


# -- plugin interfaces (bases that tensorrt.plugin subclasses) ----------------------------------------------
class IVersionedInterface:
    pass


class IPluginCreatorInterface(IVersionedInterface):
    pass


class IPluginCreatorV3Quick(IPluginCreatorInterface):
    def __init__(self) -> None:
        pass

    @property
    def field_names(self):
        return self._field_names

    @field_names.setter
    def field_names(self, fields) -> None:
        self._field_names = PluginFieldCollection_(fields)


def _interface(name: str, *bases: type) -> type:
    """A pybind11 trampoline base ``tensorrt.plugin`` subclasses: constructed with no arguments."""
    return type(name, bases, {"__init__": lambda self: None, "__module__": __name__})


IPluginV3 = _interface("IPluginV3")
IPluginV3QuickCore = _interface("IPluginV3QuickCore")
IPluginV3QuickBuild = _interface("IPluginV3QuickBuild")
IPluginV3QuickRuntime = _interface("IPluginV3QuickRuntime")
IPluginV3QuickAOTBuild = _interface("IPluginV3QuickAOTBuild", IPluginV3QuickBuild)


class ITensor:
    """Network tensors (only ``isinstance`` checks reach this class here)."""

    __slots__ = ()


class IPluginRegistry:
    """Creators by (name, version, namespace); a second creator with the same key is refused."""

    __slots__ = ("_creators",)

    def __init__(self) -> None:
        self._creators: dict = {}

    def register_creator(self, creator, plugin_namespace: str = "") -> bool:
        _need(creator, IPluginCreatorInterface, "register_creator")
        key = (creator.name, creator.plugin_version, _need(plugin_namespace, str, "register_creator"))
        if key in self._creators:
            print(f"[TRT shim] [E] plugin creator {key} is already registered", file=sys.stderr)
            return False
        self._creators[key] = creator
        return True

    def get_creator(self, type: str, version: str, plugin_namespace: str = ""):  # noqa: A002
        return self._creators.get((type, version, plugin_namespace))

    @property
    def all_creators(self) -> list:
        return list(self._creators.values())


_REGISTRY = IPluginRegistry()


def get_plugin_registry() -> IPluginRegistry:
    return _REGISTRY


# -- shapes and symbolic expressions ----------------------------------------------------------------------
_FOLD = {DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
         DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
         DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
         DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class IDimensionExpr:
    """A dimension expression: a constant, a named input dimension, or an operation on two."""

    __slots__ = ("_op", "_args")

    def __init__(self) -> None:
        raise TypeError("tensorrt.IDimensionExpr: No constructor defined!")

    @classmethod
    def _make(cls, op, args) -> "IDimensionExpr":
        expr = object.__new__(cls)
        expr._op, expr._args = op, args
        return expr

    def is_constant(self) -> bool:
        return self._op == "const"

    def get_constant_value(self) -> int:
        return self._args if self._op == "const" else -(2 ** 63)

    def is_size_tensor(self) -> bool:
        return False

    def _evaluate(self, dims: dict) -> int:
        """The value at concrete input dimensions ``dims`` (``{name: int}``); what TensorRT does at run time."""
        if self._op == "const":
            return self._args
        if self._op == "input":
            return dims[self._args]
        first, second = self._args
        return _FOLD[self._op](first._evaluate(dims), second._evaluate(dims))


class IExprBuilder:
    __slots__ = ()

    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr._make("const", _int_arg(value, "IExprBuilder.constant"))

    def operation(self, op, first, second) -> IDimensionExpr:
        _need(op, DimensionOperation, "IExprBuilder.operation(op)")
        _need(first, IDimensionExpr, "IExprBuilder.operation(first)")
        _need(second, IDimensionExpr, "IExprBuilder.operation(second)")
        if first.is_constant() and second.is_constant():
            return IDimensionExpr._make("const", _FOLD[op](first._args, second._args))
        return IDimensionExpr._make(op, (first, second))

    @staticmethod
    def _input(name: str) -> IDimensionExpr:
        """An input dimension whose value TensorRT knows only at run time (driver side)."""
        return IDimensionExpr._make("input", name)


class DimsExprs:
    __slots__ = ("_exprs",)

    def __init__(self, value=0) -> None:
        if isinstance(value, int):
            self._exprs = [None] * value
        else:
            self._exprs = [_need(e, IDimensionExpr, "DimsExprs") for e in value]

    def __len__(self) -> int:
        return len(self._exprs)

    def __getitem__(self, index: int) -> IDimensionExpr:
        return self._exprs[_index(self._exprs, index)]

    def __setitem__(self, index: int, expr) -> None:
        self._exprs[_index(self._exprs, index)] = _need(expr, IDimensionExpr, "DimsExprs.__setitem__")


class Dims:
    MAX_DIMS = 8
    __slots__ = ("_values",)

    def __init__(self, shape=()) -> None:
        values = [_int_arg(v, "Dims") for v in shape]
        if len(values) > self.MAX_DIMS:
            raise ValueError(f"Dims: at most {self.MAX_DIMS} dimensions")
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, index):
        return self._values[index]

    def __setitem__(self, index, value) -> None:
        self._values[index] = _int_arg(value, "Dims.__setitem__")

    def __iter__(self):
        return iter(self._values)


class PluginTensorDesc:
    __slots__ = ("_dims", "_type", "_format", "scale")

    def __init__(self) -> None:
        self._dims, self._type, self._format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, 1.0

    dims = property(lambda self: self._dims, lambda self, v: setattr(self, "_dims", v if isinstance(v, Dims)
                                                                      else Dims(v)))
    type = property(lambda self: self._type,  # noqa: A003
                    lambda self, v: setattr(self, "_type", _need(v, DataType, "PluginTensorDesc.type")))
    format = property(lambda self: self._format,  # noqa: A003
                      lambda self, v: setattr(self, "_format", _need(v, TensorFormat, "PluginTensorDesc.format")))


class DynamicPluginTensorDesc:
    __slots__ = ("desc", "min", "opt", "max")

    def __init__(self) -> None:
        self.desc, self.min, self.opt, self.max = PluginTensorDesc(), Dims(), Dims(), Dims()


class ISymExpr:
    """Write-only ``type``/``dtype``/``expr`` (pyPlugin.cpp binds them with no getter)."""

    def __init__(self) -> None:
        self._state = {}

    def _set(name, kind):
        def setter(self, value) -> None:
            if kind is not None:
                _need(value, kind, f"ISymExpr.{name}")
            elif value is not None and not isinstance(value, IDimensionExpr):
                raise TypeError(f"ISymExpr.expr: incompatible function arguments, got {type(value).__name__}")
            self._state[name] = value
        return property(None, setter)

    type = _set("type", PluginArgType)  # noqa: A003
    dtype = _set("dtype", PluginArgDataType)
    expr = _set("expr", None)
    del _set

    def _complete(self, what: str) -> "ISymExpr":
        """What TensorRT reads back from an ``ISymExpr``: all three set, a non-null expression."""
        for name in ("type", "dtype", "expr"):
            if name not in self._state:
                raise RuntimeError(f"{what}: {name} not initialized")
        if self._state["expr"] is None:
            raise RuntimeError(f"{what}: the symbolic expression is null (not built from an IExprBuilder)")
        return self


class ISymExprs:
    """The extra-argument setter TensorRT passes to ``get_launch_params`` (no Python constructor)."""

    __slots__ = ("nbSymExprs", "_exprs")

    def __init__(self) -> None:
        raise TypeError("tensorrt.ISymExprs: No constructor defined!")

    @classmethod
    def _for_builder(cls) -> "ISymExprs":
        obj = object.__new__(cls)
        obj.nbSymExprs, obj._exprs = 0, {}
        return obj

    def __len__(self) -> int:
        return self.nbSymExprs

    def __getitem__(self, index: int) -> ISymExpr:
        return self._exprs[index]

    def __setitem__(self, index: int, value) -> bool:
        if not 0 <= index < self.nbSymExprs:
            return False
        self._exprs[index] = _need(value, ISymExpr, "ISymExprs.__setitem__")._complete(f"extra argument {index}")
        return True


class KernelLaunchParams:
    """TensorRT's launch parameters (``IKernelLaunchParams``): seven ``ISymExpr`` fields, made by TensorRT."""

    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")
    __slots__ = tuple(f"_{name}" for name in _FIELDS)

    def __init__(self) -> None:
        raise TypeError("tensorrt.KernelLaunchParams: No constructor defined!")

    @classmethod
    def _for_builder(cls) -> "KernelLaunchParams":
        return object.__new__(cls)


for _field in KernelLaunchParams._FIELDS:
    setattr(KernelLaunchParams, _field, property(
        lambda self, f=_field: getattr(self, f"_{f}"),
        lambda self, value, f=_field: setattr(self, f"_{f}", _need(value, ISymExpr, f"KernelLaunchParams.{f}")
                                             ._complete(f"KernelLaunchParams.{f}"))))


def nptype(trt_type):
    mapping = {float32: np.float32, float16: np.float16, int8: np.int8, int32: np.int32, int64: np.int64,
               bool: np.bool_, uint8: np.uint8}
    if trt_type in mapping:
        return mapping[trt_type]
    raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
