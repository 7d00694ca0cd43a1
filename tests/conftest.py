"""Shared pytest fixtures and markers.

Shared read-only data (datasets, golden checkpoints) lives in ``../shared`` beside the
repo root (``ESC_SHARED_DIR`` points elsewhere) and is never copied into the repo; tests
that need it skip, naming the missing path, where it is absent.  In CI that would let a
run pass without one golden test: with ``ESC_REQUIRE_SHARED=1`` a missing shared folder
stops the session before any test runs (exit status 4), naming the folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import onnx

SHARED_DIR = Path(os.environ.get("ESC_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
#: What must exist under the shared folder for the golden tests to run at all.
SHARED_REQUIRED = ("golden", "golden_rib", "golden_fb", "data/Set5", "data/real_inputs")


def golden_index(folder: str = "golden") -> dict[str, dict]:
    """The golden cases of ``SHARED_DIR/folder/index.json`` by name; empty where it is absent.

    Module-level parametrisation reads this at import. Empty only where the shared folder is
    missing and the run does not require it: ``ESC_REQUIRE_SHARED=1`` stops the session in
    :func:`pytest_configure` before any test module is imported.
    """
    index = SHARED_DIR / folder / "index.json"
    if not index.is_file():
        return {}
    return {case["name"]: case for case in json.loads(index.read_text())}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    if os.environ.get("ESC_REQUIRE_SHARED") == "1":
        missing = [str(SHARED_DIR / part) for part in SHARED_REQUIRED if not (SHARED_DIR / part).exists()]
        if missing:
            raise pytest.UsageError(
                f"ESC_REQUIRE_SHARED=1 but the shared test data is missing: {', '.join(missing)}. Every golden "
                f"test would be skipped, so this run could not fail. Put the shared folder beside the repo "
                f"(../shared) or point ESC_SHARED_DIR at it; unset ESC_REQUIRE_SHARED only on a machine "
                f"that is not meant to run the golden tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests when CUDA is unavailable (torch imported only if such tests exist)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 on CUDA as fp32: cuDNN convolutions default to TF32 on Ampere and later (a 10-bit
    mantissa: golden outputs moved by 2.8e-3 on an H200), so reference checks turn it off."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def require_path(path: Path) -> Path:
    """Return ``path`` or skip the calling test with a reason naming it."""
    if not path.exists():
        pytest.skip(f"missing shared data: {path}")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder beside the repo root."""
    return require_path(SHARED_DIR)


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    """Golden checkpoints and reference input/output pairs (``shared/golden``)."""
    return require_path(shared_dir / "golden")


#: The cheapest golden model: the one runner and parity tests run for real.
GOLDEN_CASE = "esc_light_x4_35x35_b1"


@pytest.fixture(scope="module")
def checkpoint(golden_dir: Path) -> Path:
    """The golden esc_light x4 checkpoint."""
    return golden_dir / f"{GOLDEN_CASE}.pth"


class ArtifactCache:
    """Every costly artifact of the run (an export, a conversion, a CLI run) built once, by key.

    Whichever test asks first builds it; every other test, in any module, gets the same
    value. ``submit`` starts a build on the background worker (one at a time: the CI machine
    has 2 cores and the tests use them too), typically a conversion that runs in a child
    process, so a module can start its slow work before its cheap tests run; ``get`` waits
    for it. A build that raised raises again for every test that asks, with its own
    traceback, instead of being retried. ``folder(key)`` is the key's own empty folder for
    the files a build writes.
    """

    def __init__(self, root: Path, workers: int = 1) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._futures: dict[tuple, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="artifact")

    def folder(self, key: tuple) -> Path:
        name = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(part)) for part in key)
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _future(self, key: tuple, build: Callable[[], Any], background: bool) -> Future:
        with self._lock:
            future = self._futures.get(key)
            if future is not None:
                return future
            if background:
                future = self._pool.submit(build)
            else:
                future = Future()
                future.set_running_or_notify_cancel()
            self._futures[key] = future
        if not background:  # built here, outside the lock: other keys build meanwhile
            try:
                future.set_result(build())
            except BaseException as exc:  # noqa: BLE001 - re-raised to every caller by result()
                future.set_exception(exc)
        return future

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The value for ``key``: built now by ``build()`` unless built (or building) already."""
        return self._future(key, build, background=False).result()

    def submit(self, key: tuple, build: Callable[[], Any]) -> None:
        """Start building ``key`` in the background (a no-op if it is known already)."""
        self._future(key, build, background=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArtifactCache]:
    """The run's one :class:`ArtifactCache` (exports and conversions shared by every module)."""
    cache = ArtifactCache(tmp_path_factory.mktemp("artifacts"))
    yield cache
    cache.close()


REPO_ROOT = Path(__file__).resolve().parents[1]
#: A CLI export of a golden model takes 30-90 s on the 2-core CI machine.
CLI_EXPORT_TIMEOUT = 1200


def _cli_export(artifacts: ArtifactCache, checkpoint: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``python export/to_onnx.py --weights CHECKPOINT -o ...``: what a user runs, with the defaults."""
    out = artifacts.folder(("onnx-cli", checkpoint.stem)) / f"cli_{checkpoint.stem}.onnx"
    argv = [sys.executable, "export/to_onnx.py", "--weights", str(checkpoint), "-o", str(out)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLI_EXPORT_TIMEOUT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return done, out


def cli_onnx(artifacts: ArtifactCache, checkpoint: Path, background: bool = False) -> tuple[subprocess.CompletedProcess, Path] | None:
    """The default CLI export of ``checkpoint`` (one per run, shared by every module that asks).

    ``background=True`` only starts it (in the cache's worker) and returns None.
    """
    key = ("onnx-cli", checkpoint.stem)
    if background:
        artifacts.submit(key, lambda: _cli_export(artifacts, checkpoint))
        return None
    return artifacts.get(key, lambda: _cli_export(artifacts, checkpoint))


@pytest.fixture(scope="session")
def golden_onnx(golden_dir: Path, artifacts: ArtifactCache) -> Path:
    """The golden esc_light x4 model as ``python export/to_onnx.py --weights`` writes it (fp32, opset 18,
    dynamic shape); the same file tests/test_onnx_export.py checks as a CLI export."""
    done, path = cli_onnx(artifacts, golden_dir / f"{GOLDEN_CASE}.pth")
    if done.returncode != 0:
        pytest.fail(f"the CLI export of {GOLDEN_CASE} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return path


@pytest.fixture(scope="module")
def golden_model(checkpoint: Path) -> Any:
    """The golden esc_light x4 model (sdpa, deployed): the reference of the export-gate tests."""
    from models import load_model

    return load_model(checkpoint, attention="sdpa")


@pytest.fixture(scope="module")
def gate_inputs() -> list:
    """One picture-like input (smooth gradients plus noise) of a size off the window grid."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 40)
    x = (ramp[None, :] * ramp[:, None]).expand(1, 3, 40, 40) * 0.8 + 0.2 * torch.rand(1, 3, 40, 40, generator=generator)
    return [x.contiguous()]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but genuine ESC x2 checkpoint in the official format (``params_ema``): 8x8
    windows, one block, about 13k parameters, so CLI tests run in seconds."""
    import torch

    from models.config import ESCConfig
    from models.loader import build

    config = ESCConfig(arch="esc", scale=2, dim=16, pdim=8, kernel_size=5, n_blocks=1, conv_blocks=1,
                       window_size=8, num_heads=1)
    model = build(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("plk_filter", "relative_position_bias")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    path = tmp_path_factory.mktemp("tiny") / "tiny_esc_x2.pth"
    torch.save({"params_ema": model.state_dict()}, path)
    return path


# -- deliberately broken artifacts: every gate must reject them --------------------------
def _rewire_output(model: onnx.ModelProto, make: Callable[[str, str], list[onnx.NodeProto]]) -> None:
    """Rename the graph output's producer to ``<out>_raw`` and append ``make(raw, out)`` nodes."""
    out = model.graph.output[0].name
    raw = f"{out}_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == out else o for o in node.output]
    model.graph.node.extend(make(raw, out))


def _graph_constant(model: onnx.ModelProto, name: str, value: float) -> str:
    from onnx import TensorProto, helper

    model.graph.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, [], [value]))
    return name


def shift_one_pixel(model: onnx.ModelProto, amount: float) -> None:
    """Make ``model``'s output off by ``amount`` at the value nearest 0.5, exact elsewhere (in place).

    A gate's max-abs leg just past (or just inside) its bound with the PSNR leg untouched;
    the pixel nearest mid-grey stays inside [0, 1], so clamping cannot hide the shift.
    """
    import onnx
    from onnx import helper

    half, step = _graph_constant(model, "near_half", 0.5), _graph_constant(model, "near_step", amount)
    _rewire_output(model, lambda raw, out: [
        helper.make_node("Sub", [raw, half], ["near_centred"]),
        helper.make_node("Abs", ["near_centred"], ["near_distance"]),
        helper.make_node("ReduceMin", ["near_distance"], ["near_min"], keepdims=1),
        helper.make_node("Equal", ["near_distance", "near_min"], ["near_is_it"]),
        helper.make_node("Cast", ["near_is_it"], ["near_mask"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["near_mask", step], ["near_shift"]),
        helper.make_node("Add", [raw, "near_shift"], [out])])


def shift_one_pixel_onnx(src: Path, dst: Path, amount: float) -> Path:
    """Copy of ``src`` with :func:`shift_one_pixel` applied."""
    import onnx

    model = onnx.load(str(src))
    shift_one_pixel(model, amount)
    onnx.save(model, str(dst))
    return dst


def contract_output_onnx(src: Path, dst: Path, k: float) -> Path:
    """Copy of ``src`` whose output is pulled towards 0.5 by ``k``: ``0.5 + (sr - 0.5)(1 - k)``.

    An error spread over every pixel (a PSNR leg), that stays in [0, 1] wherever the output
    does; :func:`contraction_for_psnr` picks ``k`` for a target PSNR.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    half, keep = _graph_constant(model, "pull_half", 0.5), _graph_constant(model, "pull_keep", 1.0 - k)
    _rewire_output(model, lambda raw, out: [
        helper.make_node("Sub", [raw, half], ["pull_centred"]),
        helper.make_node("Mul", ["pull_centred", keep], ["pull_scaled"]),
        helper.make_node("Add", ["pull_scaled", half], [out])])
    onnx.save(model, str(dst))
    return dst


def contraction_for_psnr(reference: Any, target_db: float) -> float:
    """The ``k`` of :func:`contract_output_onnx` whose clamped output is ``target_db`` from the clamped
    ``reference`` (an output of the model, any shape), by bisection in float64."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64)
    clipped = np.clip(ref, 0.0, 1.0)

    def psnr(k: float) -> float:
        diff = np.clip(0.5 + (ref - 0.5) * (1.0 - k), 0.0, 1.0) - clipped
        return -10.0 * np.log10(np.mean(diff * diff))

    low, high = 1e-9, 1.0          # psnr falls as k grows
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if psnr(mid) > target_db else (low, mid)
    return (low + high) / 2


def swap_channels_onnx(src: Path, dst: Path) -> Path:
    """Copy of ``src`` whose output channels come out BGR instead of RGB."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    model.graph.initializer.append(helper.make_tensor("bgr_order", TensorProto.INT64, [3], [2, 1, 0]))
    _rewire_output(model, lambda raw, out: [helper.make_node("Gather", [raw, "bgr_order"], [out], axis=1)])
    onnx.save(model, str(dst))
    return dst


def corrupt_constant_onnx(src: Path, dst: Path, factor: float = 1.02) -> Path:
    """Copy of ``src`` with its largest float weight multiplied by ``factor`` (a 2% corruption)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    onnx.save(model, str(dst))
    return dst
