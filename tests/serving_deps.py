"""Skip serving tests when their optional extra is absent, unless the run requires it.

The main suite runs without ``esc-deploy[serve]`` (PyTriton pins numpy < 2), so these tests
skip there with the reason. ``.ci/run`` then installs the extra and runs them again with
``ESC_REQUIRE_SERVE=1``: in that run a missing package or server binary is a failure, so a
broken install can never turn the serving tests into silent skips that look like a pass.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRED = os.environ.get("ESC_REQUIRE_SERVE") == "1"


def skip_unless_required(reason: str) -> None:
    """Skip with ``reason``, or fail with it when ``ESC_REQUIRE_SERVE=1``."""
    if REQUIRED:
        pytest.fail(f"ESC_REQUIRE_SERVE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def import_serving(name: str, reason: str) -> ModuleType:
    """Import ``name`` or skip (fail when required) with ``reason``."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        skip_unless_required(f"{reason} ({exc})")
        raise  # unreachable: skip/fail raise; keeps type checkers honest
