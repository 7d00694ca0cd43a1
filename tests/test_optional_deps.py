"""The optional-dependency gate: a skip without the package, a failure when the run requires it.

Each case runs pytest on a probe file in a subprocess, with the group's variable set or not,
once with the import inside a test and once at module level (the form test_serve.py uses:
pytest 9 refuses a bare ``pytest.skip`` there, which turned the whole module into an error).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MISSING = "no_such_optional_package_xyz"
PROBES = {
    "in-test": f"from optional_deps import need\n\ndef test_needs_it():\n"
               f"    need({MISSING!r}, 'the extra is not installed', group={{group!r}})\n",
    "module-level": f"from optional_deps import need\n\nneed({MISSING!r}, 'the extra is not installed', "
                    f"group={{group!r}})\n\ndef test_needs_it():\n    pass\n",
}


def run_probe(tmp_path: Path, where: str, group: str, env_value: str | None,
              other: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBES[where].format(group=group))
    env = {k: v for k, v in os.environ.items() if k not in ("ESC_REQUIRE_ALL", "ESC_REQUIRE_SERVE")}
    env["PYTHONPATH"] = str(TESTS)
    env.update(other or {})
    if env_value is not None:
        env[{"all": "ESC_REQUIRE_ALL", "serve": "ESC_REQUIRE_SERVE"}[group]] = env_value
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(probe)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("where", list(PROBES))
@pytest.mark.parametrize("group", ["all", "serve"])
def test_missing_package_skips_when_not_required(tmp_path: Path, where: str, group: str) -> None:
    done = run_probe(tmp_path, where, group, env_value=None)
    # A module skipped whole leaves nothing collected: pytest's exit 5, not an error.
    assert done.returncode == (0 if where == "in-test" else 5), done.stdout + done.stderr
    assert "1 skipped" in done.stdout and "the extra is not installed" in done.stdout, done.stdout
    assert " error" not in done.stdout and "ERROR" not in done.stdout, done.stdout  # not a collection error


@pytest.mark.parametrize("where", list(PROBES))
@pytest.mark.parametrize("group", ["all", "serve"])
def test_missing_package_fails_when_required(tmp_path: Path, where: str, group: str) -> None:
    done = run_probe(tmp_path, where, group, env_value="1")
    assert done.returncode != 0, done.stdout + done.stderr
    variable = {"all": "ESC_REQUIRE_ALL", "serve": "ESC_REQUIRE_SERVE"}[group]
    assert f"{variable}=1 but the extra is not installed" in done.stdout, done.stdout
    assert "skipped" not in done.stdout, done.stdout


def test_only_the_value_1_requires(tmp_path: Path) -> None:
    """``0`` (or anything but ``1``) keeps the skip; the other group's variable does not count."""
    assert "1 skipped" in run_probe(tmp_path, "in-test", "all", env_value="0").stdout
    done = run_probe(tmp_path, "in-test", "all", env_value=None, other={"ESC_REQUIRE_SERVE": "1"})
    assert "1 skipped" in done.stdout, done.stdout


def test_a_broken_install_counts_as_missing(tmp_path: Path) -> None:
    """An import that raises something other than ImportError is still reported, and fails when required."""
    (tmp_path / "broken_pkg_xyz.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    probe = tmp_path / "test_probe.py"
    probe.write_text("from optional_deps import need\n\ndef test_needs_it():\n"
                     "    need('broken_pkg_xyz', 'the extra is broken')\n")
    base = {k: v for k, v in os.environ.items() if k != "ESC_REQUIRE_ALL"}
    base["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(tmp_path)])
    for value, outcome in ((None, "1 skipped"), ("1", "1 failed")):
        env = dict(base, **({"ESC_REQUIRE_ALL": value} if value else {}))
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(probe)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert outcome in done.stdout and "OSError: libfoo.so" in done.stdout, done.stdout
