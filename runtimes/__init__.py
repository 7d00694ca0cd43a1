"""One small interface over the runtimes that execute an exported ESC model.

``from runtimes import load, Runner, RunnerError, register_runner`` works as the README
shows.  The names resolve lazily (PEP 562), so ``import runtimes.metadata`` or
``import runtimes.tiling`` does not pull in the registry, and no back-end
(onnxruntime, TensorRT, coremltools, OpenVINO) is imported until :func:`load` needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "InferTimings": "runtimes.base",
    "Runner": "runtimes.base",
    "RunnerError": "runtimes.base",
    "load": "runtimes.base",
    "register_runner": "runtimes.base",
    "registered_runners": "runtimes.base",
    "supported_suffixes": "runtimes.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the defining module on first access of a public name."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'runtimes' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
