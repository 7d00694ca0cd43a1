"""export.verify, the gate every exporter ends with: it passes the real export and
rejects deliberately broken ones (a corrupted constant, swapped output channels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import corrupt_constant_onnx, swap_channels_onnx

from export.verify import ExportParityError, verify_artifact
from validation.compare import threshold_for


def test_the_real_export_passes(golden_onnx: Path, golden_model: torch.nn.Module,
                                gate_inputs: list[torch.Tensor]) -> None:
    results = verify_artifact(golden_onnx, golden_model, gate_inputs, "fp32", threads=2)
    assert all(r.passed for r in results) and results[0].max_abs <= threshold_for("fp32").atol


@pytest.mark.parametrize("breakage", ["corrupted_constant", "swapped_channels"])
def test_a_broken_export_fails_the_gate(breakage: str, golden_onnx: Path, golden_model: torch.nn.Module,
                                        gate_inputs: list[torch.Tensor], tmp_path: Path) -> None:
    make = corrupt_constant_onnx if breakage == "corrupted_constant" else swap_channels_onnx
    bad = make(golden_onnx, tmp_path / f"{breakage}.onnx")
    with pytest.raises(ExportParityError, match=r"does not match PyTorch at fp32 \(max abs error <= 0.0001\)"):
        verify_artifact(bad, golden_model, gate_inputs, "fp32", threads=2)
    result = verify_artifact(bad, golden_model, gate_inputs, "fp32", raise_on_failure=False, threads=2)[0]
    assert not result.passed and result.max_abs > threshold_for("fp32").atol
