"""export.common.atomic_output for directories (``.mlpackage``): a racing pair of exports
leaves one complete package and nothing else, and the path never disappears meanwhile.

The exports run in two processes (forked: real parallelism, no shared interpreter lock)
that finish writing together and then race for the final name; a thread of the test
process watches the path the whole time.  Each rename in the children is delayed by
50 ms, as on a slow network file system: the race window between "is the old package
there?" and "rename" is then wide enough that an unguarded replace fails every round.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


def unguarded_output(target: Path):
    """What atomic_output replaces: remove the old package, then rename the new one in (no lock)."""
    @contextlib.contextmanager
    def output():
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.mkdir()
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    return output()


def export(target: Path, writer: str, barrier: multiprocessing.synchronize.Barrier, guarded: bool,
           spans: Any, slot: int) -> None:
    """One export in a child process; a failure is its exit status (and traceback on stderr).

    ``spans[slot]`` / ``spans[slot + 1]``: when this writer left the barrier and when its
    export returned (monotonic seconds), so the test can see that the two really raced.
    """
    rename = os.replace

    def slow_rename(src: object, dst: object) -> None:
        time.sleep(0.05)
        rename(src, dst)

    os.replace = slow_rename  # this child process only
    with (atomic_output(target) if guarded else unguarded_output(target)) as tmp:
        write_package(tmp, writer)
        barrier.wait(timeout=30)  # both writers finish together, then race for the final name
        spans[slot] = time.monotonic()
    spans[slot + 1] = time.monotonic()


def watch(target: Path, existing: bool, done: threading.Event, missing: list[int], round_: int) -> None:
    """Record ``round_`` whenever a package that existed before is missing."""
    while not done.is_set():
        if existing and not target.exists():
            missing.append(round_)


def race(tmp_path: Path, existing: bool, guarded: bool, rounds: int = 6) -> tuple[list[str], int]:
    """Two forked exports racing for one path, ``rounds`` times: (what went wrong, rounds that overlapped)."""
    target = tmp_path / "model.mlpackage"
    if existing:
        write_package(target, "old")
    problems: list[str] = []
    missing: list[int] = []
    overlapped = 0
    fork = multiprocessing.get_context("fork")
    for round_ in range(rounds):
        barrier = fork.Barrier(2)
        spans = fork.Array("d", 4)
        done = threading.Event()
        watcher = threading.Thread(target=watch, args=(target, existing, done, missing, round_))
        writers = [fork.Process(target=export, args=(target, f"w{round_}{k}", barrier, guarded, spans, 2 * i))
                   for i, k in enumerate("ab")]
        watcher.start()
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=60)
        done.set()
        watcher.join()
        if [w.exitcode for w in writers] != [0, 0]:
            problems.append(f"round {round_}: an export failed (exit codes {[w.exitcode for w in writers]})")
            continue
        overlapped += max(spans[0], spans[2]) < min(spans[1], spans[3])
        try:
            if package_owner(target) not in (f"w{round_}a", f"w{round_}b"):
                problems.append(f"round {round_}: the package is not one of this round's")
        except (AssertionError, OSError) as exc:
            problems.append(f"round {round_}: {exc}")
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "model.mlpackage")
        if leftovers:
            problems.append(f"round {round_}: leftover {leftovers}")
    if missing:
        problems.append(f"the package path was missing during rounds {sorted(set(missing))}")
    return problems, overlapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked writers; the exchange is Linux's")
@pytest.mark.parametrize("existing", [False, True], ids=["new path", "replacing a package"])
def test_two_racing_exports_leave_one_complete_package(existing: bool, tmp_path: Path) -> None:
    problems, overlapped = race(tmp_path, existing, guarded=True)
    assert problems == []
    assert overlapped >= 3, f"the two exports overlapped in only {overlapped} of 6 rounds: the race was not run"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked writers; the exchange is Linux's")
def test_the_race_breaks_an_unguarded_replace(tmp_path: Path) -> None:
    """The same harness fails the remove-then-rename that atomic_output replaces: it can fail."""
    problems, _ = race(tmp_path, existing=True, guarded=False)
    assert problems, "the unguarded replace survived every round: the harness does not race"


def test_a_failed_export_keeps_the_old_package(tmp_path: Path) -> None:
    target = tmp_path / "model.mlpackage"
    write_package(target, "old")
    with pytest.raises(RuntimeError, match="converter crashed"), atomic_output(target) as tmp:
        write_package(tmp, "new")
        raise RuntimeError("converter crashed")
    assert package_owner(target) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mlpackage"]
