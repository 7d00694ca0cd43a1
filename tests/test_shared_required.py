"""CI cannot pass vacuously: with ``ESC_REQUIRE_SHARED=1`` a missing shared folder stops
the test session (exit status 4) instead of skipping every golden test.

Each case runs pytest in a subprocess on one golden test, with ``ESC_SHARED_DIR`` pointing
at a folder that does not exist (or at the real one, for the control).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DIR

REPO = Path(__file__).resolve().parents[1]
GOLDEN_TEST = "tests/test_runners.py::test_torch_runner_reproduces_the_golden_vector"


def run_pytest(shared: Path, require: bool, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ESC_REQUIRE_SHARED", "ESC_SHARED_DIR")}
    env["ESC_SHARED_DIR"] = str(shared)
    if require:
        env["ESC_REQUIRE_SHARED"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, GOLDEN_TEST],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_missing_shared_data_fails_the_session_when_required(tmp_path: Path) -> None:
    missing = tmp_path / "no-shared-here"
    result = run_pytest(missing, require=True)
    output = result.stdout + result.stderr
    assert result.returncode == 4, output  # pytest's "usage error": nothing ran, nothing passed
    assert f"ESC_REQUIRE_SHARED=1 but the shared test data is missing: {missing / 'golden'}" in output
    assert "passed" not in result.stdout and "skipped" not in result.stdout


def test_without_the_requirement_golden_tests_skip(tmp_path: Path) -> None:
    """What the requirement guards against: the same run passes with everything skipped."""
    result = run_pytest(tmp_path / "no-shared-here", require=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "missing shared data" in result.stdout


def test_present_shared_data_satisfies_the_requirement() -> None:
    if not SHARED_DIR.exists():
        pytest.skip(f"missing shared data: {SHARED_DIR}")
    result = run_pytest(SHARED_DIR, require=True, extra=("--collect-only",))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 test collected" in result.stdout
