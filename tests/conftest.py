"""Shared pytest fixtures and markers.

Shared read-only data (datasets, golden checkpoints) lives in ``../shared`` beside the
repo root (``ESC_SHARED_DIR`` points elsewhere) and is never copied into the repo; tests
that need it skip, naming the missing path, where it is absent.  In CI that would let a
run pass without one golden test: with ``ESC_REQUIRE_SHARED=1`` a missing shared folder
stops the session before any test runs (exit status 4), naming the folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import onnx

SHARED_DIR = Path(os.environ.get("ESC_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared")
#: What must exist under the shared folder for the golden tests to run at all.
SHARED_REQUIRED = ("golden", "data/Set5", "data/real_inputs")


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


@pytest.fixture(scope="module")
def golden_onnx(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden model exported once per test session (every module that asks shares the file)."""
    path = tmp_path_factory.getbasetemp() / f"{GOLDEN_CASE}.onnx"
    if not path.exists():
        export_esc_onnx(checkpoint, path)
    return path


def export_esc_onnx(checkpoint: Path, path: Path) -> Path:
    """Dynamic-shape fp32 opset-18 ONNX of a checkpoint, through the toolkit's own exporter."""
    from export.onnx_export import export_onnx
    from models import load_model

    export_onnx(load_model(checkpoint, attention="sdpa"), path, opset=18, precision="fp32", shape="dynamic")
    return path


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
