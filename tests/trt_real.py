"""NVIDIA's TensorRT Python sources for CPU tests: the bindings wheels, downloaded once and cached.

PyPI serves the TensorRT bindings wheels (~1.3 MB each). Their ``tensorrt.so`` needs
libnvinfer, but ``tensorrt_bindings/plugin/`` is NVIDIA's pure-Python ``tensorrt.plugin``
and the ``.so`` holds every bound name and docstring as plain strings; ``tensorrt-stubs``
has ``.pyi`` stubs. Wheels are cached under ``ESC_TRT_WHEEL_CACHE`` (default
``~/.cache/esc-deploy/tensorrt-wheels``) and checked against the SHA-256 recorded here, so
a rerun does not download again and a changed file is never used. A wheel that cannot be
had raises :class:`WheelUnavailable`, which tests turn into ``skip_or_fail`` (a failure in
CI, where ``ESC_REQUIRE_ALL=1``).

:func:`stage` builds an importable ``tensorrt`` package per version: ``trt_shim.py`` as its
``__init__`` (the compiled core) and the wheel's real ``plugin/`` package.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE_ENV = "ESC_TRT_WHEEL_CACHE"
DOWNLOAD_TIMEOUT_S = 300


@dataclasses.dataclass(frozen=True)
class Wheel:
    """One wheel on PyPI, pinned by version and content."""

    package: str
    version: str
    sha256: str
    filename: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


#: The TensorRT versions the plugin path is tested against (the project allows >= 10.9).
BINDINGS = {
    "11.4": Wheel("tensorrt-cu12-bindings", "11.4.0.106",
                  "e2ab48f316bbff6a7a44a30e94a9ceb0d2cf6645ff39feadecfa68d7cb7a94bf",
                  "tensorrt_cu12_bindings-11.4.0.106-cp311-none-manylinux_2_28_x86_64.whl"),
    "10.13": Wheel("tensorrt-cu11-bindings", "10.13.0.35",
                   "2a68cea284029080ad8c46aedb8a77ca4719f72e0341354749b6a24f6e2bb970",
                   "tensorrt_cu11_bindings-10.13.0.35-cp311-none-manylinux_2_28_x86_64.whl"),
    "10.9": Wheel("tensorrt-cu12-bindings", "10.9.0.34",
                  "50c78fd66dbb515b135d5f4fe28790f2eda119756950b51a6a45a77736a14b47",
                  "tensorrt_cu12_bindings-10.9.0.34-cp311-none-manylinux_2_28_x86_64.whl"),
}
STUBS = Wheel("tensorrt-stubs", "10.13.0.35.1", "749a36a1f825db0800a82d0dabbf7ef49f3a9edc1e794c9545fb94a551613fea",
              "tensorrt_stubs-10.13.0.35.1-py3-none-any.whl")


class WheelUnavailable(RuntimeError):
    """A pinned wheel could not be downloaded (or its content does not match the pin)."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "esc-deploy" / "tensorrt-wheels")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(wheel: Wheel) -> Path:
    """The cached wheel file, downloaded with ``pip download`` the first time."""
    folder = cache_dir()
    path = folder / wheel.filename
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   "3.11", "--platform", "manylinux_2_28_x86_64", "--disable-pip-version-check", "-q",
                   wheel.requirement, "-d", str(folder)]
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise WheelUnavailable(f"pip download {wheel.requirement} did not finish: {exc}") from exc
        if run.returncode != 0 or not path.is_file():
            raise WheelUnavailable(f"pip download {wheel.requirement} failed (exit {run.returncode}): "
                                   f"{(run.stderr or run.stdout).strip()[-500:]}")
    digest = _sha256(path)
    if digest != wheel.sha256:
        raise WheelUnavailable(f"{path} has SHA-256 {digest}, not the pinned {wheel.sha256}: delete it to download "
                               f"again")
    return path


def stage(version: str, root: Path) -> Path:
    """A folder to put first on ``PYTHONPATH``: ``tensorrt`` = the shim + TensorRT ``version``'s real plugin."""
    wheel = BINDINGS[version]
    package = root / f"tensorrt-{version}" / "tensorrt"
    plugin = package / "plugin"
    plugin.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetch(wheel)) as archive:
        for name in archive.namelist():
            if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
                (plugin / Path(name).name).write_bytes(archive.read(name))
    shim = (HERE / "trt_shim.py").read_text()
    package.joinpath("__init__.py").write_text(shim.replace('__version__ = "shim"', f'__version__ = "{wheel.version}"',
                                                            1))
    return package.parent


def staged(version: str, artifacts: Any) -> Path:
    """:func:`stage` once per test run (conftest's ``artifacts``); skip, or fail in CI, without the wheel."""
    from optional_deps import skip_or_fail

    try:
        return artifacts.get(("trt-stage", version), lambda: stage(version, artifacts.folder(("trt-stage",))))
    except WheelUnavailable as exc:
        skip_or_fail(f"the TensorRT {version} bindings wheel is unavailable: {exc}")
        raise


def bindings_strings(version: str) -> set[str]:
    """Every printable run of >= 4 characters in the wheel's ``tensorrt.so`` (what ``strings`` prints)."""
    with zipfile.ZipFile(fetch(BINDINGS[version])) as archive:
        data = archive.read("tensorrt_bindings/tensorrt.so")
    return {m.group().decode() for m in re.finditer(rb"[\x20-\x7e\t\n]{4,}", data)}


def in_strings(name: str, strings: set[str]) -> bool:
    """Whether ``name`` is one of the ``.so``'s NUL-terminated strings, alone or as the tail of a longer one.

    The linker merges a string into the end of a longer one that ends with it (``name``
    is stored as the tail of ``plugin_name``), so a bound name need not stand alone.
    """
    return name in strings or any(s.endswith(name) for s in strings)


def stub_source() -> str:
    """``tensorrt_bindings/tensorrt.pyi`` of ``tensorrt-stubs``."""
    with zipfile.ZipFile(fetch(STUBS)) as archive:
        return archive.read("tensorrt_bindings/tensorrt.pyi").decode()
