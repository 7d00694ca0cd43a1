"""Optional packages and data: skip a test without them, unless the run requires them.

A skip is the right answer on a laptop without the serve extra; in CI the same skip would
let a broken install pass unseen. So each requirement belongs to a group with its own
environment variable, and a run that sets it turns the skip into a failure naming what is
missing:

- ``ESC_REQUIRE_ALL=1``: everything ``.[all]`` installs (coremltools, Triton,
  onnxruntime-extensions, OpenVINO, ...) and whatever the test suite downloads.
- ``ESC_REQUIRE_SERVE=1``: the ``.[serve]`` extra (PyTriton, tritonclient), which CI installs
  in a second environment (PyTriton pins numpy < 2).

Every helper works at module level (a whole test module skips) and inside a test.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

GROUPS = {"all": "ESC_REQUIRE_ALL", "serve": "ESC_REQUIRE_SERVE"}


def required(group: str) -> bool:
    """Whether this run must have what ``group`` names (its variable is ``1``)."""
    return os.environ.get(GROUPS[group]) == "1"


def skip_or_fail(reason: str, group: str = "all") -> None:
    """Skip with ``reason``, or fail with it when the group is required."""
    if required(group):
        pytest.fail(f"{GROUPS[group]}=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(name: str, reason: str, group: str = "all") -> ModuleType:
    """Import ``name``, or skip (fail when required) with ``reason`` and the import error.

    Any exception counts, not only ImportError: a broken install (a missing shared
    library, an ABI mismatch) must not pass as "not installed" in a run that requires it.
    """
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - reported, never swallowed
        skip_or_fail(f"{reason} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})", group)
        raise  # unreachable: skip/fail raise; keeps type checkers honest
