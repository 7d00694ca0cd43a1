"""export.common.atomic_output for directories (``.mlpackage``): a racing pair of exports
leaves one complete package and nothing else, and the path never disappears meanwhile.

The exports run in two processes (forked: real parallelism, no shared interpreter lock)
that finish writing together and then race for the final name; a thread of the test
process watches the path the whole time.  Each rename in the children is delayed by
50 ms, as on a slow network file system: the race window between "is the old package
there?" and "rename" is then wide enough that an unguarded replace fails every round.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from export.common import atomic_output

FILES = 40  # enough files that a half-copied package would show


def write_package(folder: Path, writer: str) -> None:
    (folder / "Data").mkdir(parents=True)
    for i in range(FILES):
        (folder / "Data" / f"part{i:02d}.bin").write_text(f"{writer}:{i}")
    (folder / "Manifest.json").write_text(writer)


def package_owner(folder: Path) -> str:
    """The one writer every file of ``folder`` comes from; fails on a mixed or partial package."""
    owner = (folder / "Manifest.json").read_text()
    parts = sorted((folder / "Data").iterdir())
    assert len(parts) == FILES, f"{len(parts)} of {FILES} files"
    assert all(p.read_text() == f"{owner}:{i}" for i, p in enumerate(parts)), "files from two exports"
    return owner


def export(target: Path, writer: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    """One export in a child process; a failure is its exit status (and traceback on stderr)."""
    rename = os.replace

    def slow_rename(src: object, dst: object) -> None:
        time.sleep(0.05)
        rename(src, dst)

    os.replace = slow_rename  # this child process only
    with atomic_output(target) as tmp:
        write_package(tmp, writer)
        barrier.wait(timeout=30)  # both writers finish together, then race for the final name


def watch(target: Path, existing: bool, done: threading.Event, missing: list[int], round_: int) -> None:
    """Record ``round_`` whenever a package that existed before is missing."""
    while not done.is_set():
        if existing and not target.exists():
            missing.append(round_)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked writers; the exchange is Linux's")
@pytest.mark.parametrize("existing", [False, True], ids=["new path", "replacing a package"])
def test_two_racing_exports_leave_one_complete_package(existing: bool, tmp_path: Path) -> None:
    target = tmp_path / "model.mlpackage"
    if existing:
        write_package(target, "old")
    missing: list[int] = []
    fork = multiprocessing.get_context("fork")
    for round_ in range(6):
        barrier = fork.Barrier(2)
        done = threading.Event()

        watcher = threading.Thread(target=watch, args=(target, existing, done, missing, round_))
        writers = [fork.Process(target=export, args=(target, f"w{round_}{k}", barrier)) for k in "ab"]
        watcher.start()
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=60)
        done.set()
        watcher.join()
        assert [w.exitcode for w in writers] == [0, 0], "an export failed (its traceback is above)"
        assert package_owner(target) in (f"w{round_}a", f"w{round_}b")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"], "leftover temporary folders"
    assert missing == [], f"the package path was missing during rounds {sorted(set(missing))}"


def test_a_failed_export_keeps_the_old_package(tmp_path: Path) -> None:
    target = tmp_path / "model.mlpackage"
    write_package(target, "old")
    with pytest.raises(RuntimeError, match="converter crashed"), atomic_output(target) as tmp:
        write_package(tmp, "new")
        raise RuntimeError("converter crashed")
    assert package_owner(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]
