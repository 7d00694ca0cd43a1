"""The serving tests' skip gate turns into a failure when CI requires the serve extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(("required", "outcome"), [("0", "1 skipped"), ("1", "1 failed")])
def test_missing_serving_package(required: str, outcome: str, tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("from serving_deps import import_serving\n\n"
                     "def test_needs_it():\n"
                     "    import_serving('no_such_serving_package_xyz', 'the serve extra is not installed')\n")
    env = {**os.environ, "ESC_REQUIRE_SERVE": required, "PYTHONPATH": str(TESTS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(probe)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert outcome in done.stdout, done.stdout + done.stderr
    assert "the serve extra is not installed" in done.stdout, done.stdout  # the reason is shown either way
