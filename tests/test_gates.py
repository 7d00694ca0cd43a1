"""Every parity gate trips just past its bound and passes just inside it, on each of its legs.

A gate tested only against inputs 100x over its threshold cannot tell 1e-4 from 1e-3. Here
the broken input is 10% past the bound (max abs error 1.1 x atol, PSNR 0.1 dB under the
floor) and the control 10% inside (0.9 x atol, 0.1 dB over), for:

- :func:`validation.compare.compare` with every entry of the one threshold table;
- :func:`export.verify.verify_artifact` (what every exporter ends with) on the golden ONNX
  export, perturbed in the graph (:func:`conftest.shift_one_pixel_onnx` moves one pixel:
  the max-abs leg alone; :func:`conftest.contract_output_onnx` spreads the error: the PSNR leg);
- ``export/to_trt.py``'s parity gate on the same files.

The bounds the inputs are built on are the README's promises, written here (not read from the
table): a gate whose table entry drifts from the promise then fails these tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import contract_output_onnx, contraction_for_psnr, shift_one_pixel_onnx

from export.verify import ExportParityError, reference_outputs, verify_artifact
from validation.compare import THRESHOLDS, Threshold, compare

INSIDE, PAST = 0.9, 1.1          # of the max-abs bound
PSNR_MARGIN_DB = 0.1
#: What the README promises per precision (max abs error, PSNR floor in dB).
PROMISED = {"fp32": Threshold(atol=1e-4), "fp16": Threshold(atol=2e-2, min_psnr=50.0),
            "bf16": Threshold(atol=1e-1, min_psnr=40.0)}


def test_the_table_is_what_the_readme_promises() -> None:
    assert THRESHOLDS == PROMISED


# -- compare() itself ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.random.default_rng(0).uniform(0.2, 0.8, size=(1, 3, 48, 40))


def _one_pixel(picture: np.ndarray, amount: float) -> np.ndarray:
    out = picture.copy()
    out[0, 1, 20, 17] += amount
    return out


def _spread(picture: np.ndarray, psnr_db: float) -> np.ndarray:
    """``picture`` plus +-e at every pixel, e chosen so the PSNR (data range 1) is ``psnr_db``."""
    signs = np.where(np.random.default_rng(1).random(picture.shape) < 0.5, -1.0, 1.0)
    return picture + signs * 10.0 ** (-psnr_db / 20.0)


@pytest.mark.parametrize("precision", list(PROMISED))
def test_compare_max_abs_leg(picture: np.ndarray, precision: str) -> None:
    limit = PROMISED[precision]
    inside = compare(picture, _one_pixel(picture, INSIDE * limit.atol), atol=limit.atol, min_psnr=limit.min_psnr)
    past = compare(picture, _one_pixel(picture, PAST * limit.atol), atol=limit.atol, min_psnr=limit.min_psnr)
    assert inside.passed, inside.summary()
    assert not past.passed and past.reasons == [f"max abs error {past.max_abs:.3g} > atol {limit.atol:.3g}"]


@pytest.mark.parametrize("precision", [p for p, t in PROMISED.items() if t.min_psnr is not None])
def test_compare_psnr_leg(picture: np.ndarray, precision: str) -> None:
    limit = PROMISED[precision]
    inside = compare(picture, _spread(picture, limit.min_psnr + PSNR_MARGIN_DB), atol=limit.atol,
                     min_psnr=limit.min_psnr)
    past = compare(picture, _spread(picture, limit.min_psnr - PSNR_MARGIN_DB), atol=limit.atol,
                   min_psnr=limit.min_psnr)
    assert inside.passed and inside.max_abs < limit.atol, inside.summary()
    assert not past.passed and past.max_abs < limit.atol, past.summary()   # the PSNR leg alone trips
    assert past.reasons[-1].startswith(f"PSNR {past.psnr:.2f} dB < {limit.min_psnr:.2f} dB")


# -- the export gate, on a real artifact ----------------------------------------------------------------
@pytest.fixture(scope="module")
def expected(golden_model: torch.nn.Module, gate_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return reference_outputs(golden_model, gate_inputs)


def _gate(path: Path, expected: list[torch.Tensor], gate_inputs: list[torch.Tensor], precision: str):
    return verify_artifact(path, expected, gate_inputs, precision, raise_on_failure=False, threads=2)[0]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_gate_max_abs_leg(golden_onnx: Path, expected, gate_inputs, precision: str, tmp_path: Path) -> None:
    limit = PROMISED[precision]
    inside = _gate(shift_one_pixel_onnx(golden_onnx, tmp_path / "inside.onnx", INSIDE * limit.atol),
                   expected, gate_inputs, precision)
    past = shift_one_pixel_onnx(golden_onnx, tmp_path / "past.onnx", PAST * limit.atol)
    assert inside.passed, inside.summary()
    with pytest.raises(ExportParityError, match=rf"does not match PyTorch at {precision} .*max abs error"):
        verify_artifact(past, expected, gate_inputs, precision, threads=2)


def test_export_gate_psnr_leg(golden_onnx: Path, expected, gate_inputs, tmp_path: Path) -> None:
    limit = PROMISED["fp16"]
    ref = expected[0].numpy()
    results = {}
    for label, target in (("inside", limit.min_psnr + PSNR_MARGIN_DB), ("past", limit.min_psnr - PSNR_MARGIN_DB)):
        path = contract_output_onnx(golden_onnx, tmp_path / f"{label}.onnx", contraction_for_psnr(ref, target))
        results[label] = _gate(path, expected, gate_inputs, "fp16")
    inside, past = results["inside"], results["past"]
    assert inside.passed, inside.summary()
    assert not past.passed and past.max_abs < limit.atol, past.summary()
    assert abs(past.psnr - (limit.min_psnr - PSNR_MARGIN_DB)) < 0.02 and any("PSNR" in r for r in past.reasons)


def test_trt_parity_gate_max_abs_leg(golden_onnx: Path, golden_model: torch.nn.Module, gate_inputs,
                                    tmp_path: Path) -> None:
    """``to_trt``'s gate (the rows its summary prints) reads the same table."""
    from export.to_trt import parity_gate

    atol = PROMISED["fp32"].atol
    rows, ok = parity_gate(shift_one_pixel_onnx(golden_onnx, tmp_path / "inside.onnx", INSIDE * atol), golden_model,
                           gate_inputs, "fp32", device="cpu")
    assert ok, rows
    rows, ok = parity_gate(shift_one_pixel_onnx(golden_onnx, tmp_path / "past.onnx", PAST * atol), golden_model,
                           gate_inputs, "fp32", device="cpu")
    assert not ok and "FAILED (needs max abs error <= 0.0001)" in rows[0][1], rows
