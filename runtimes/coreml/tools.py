"""coremltools, imported once and quietly, for the runner and the exporter alike.

Why: importing coremltools prints warnings (an untested torch version, no Core ML
framework on Linux) that would bury a command's own output; a missing install should be
one clear error in the caller's own error type, not a traceback.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any

__all__ = ["import_coremltools"]


def import_coremltools(error: type[Exception], purpose: str) -> Any:
    """The ``coremltools`` module, loggers at ERROR; ``error("<purpose> needs coremltools ...")`` if absent."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import coremltools as ct
        except Exception as exc:
            raise error(f"{purpose} needs coremltools (pip install coremltools): {exc}") from exc
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct
