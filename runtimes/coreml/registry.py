"""The kernel registry of the Core ML interpreter and the view kernels have of one op.

Why separate: the kernel modules (:mod:`.kernels`, :mod:`.shape_kernels`,
:mod:`.constexpr`) each register into :data:`KERNELS`; the interpreter looks ops up there
and refuses a program naming an op that no module registered.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .reader import ArgRef, InterpreterError, MILOp

__all__ = ["KERNELS", "Call", "Kernel", "as_f32", "axis_index", "kernel"]

Kernel = Callable[["Call"], Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*names: str) -> Callable[[Kernel], Kernel]:
    """Register the decorated function as the kernel of the MIL op(s) ``names``."""
    def register(fn: Kernel) -> Kernel:
        for name in names:
            KERNELS[name] = fn
        return fn
    return register


class Call:
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


def axis_index(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def as_f32(a: Any) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == np.float32 else a.astype(np.float32)

