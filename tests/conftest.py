"""Shared pytest fixtures and markers.

Shared read-only data (datasets, golden checkpoints) lives in ``../shared`` beside the
repo root and is never copied into the repo; tests that need it skip, naming the
missing path, where it is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


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
