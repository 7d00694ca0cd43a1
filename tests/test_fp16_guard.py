"""fp16 safety as the exporters apply it (``export.calibration.guard_fp16``, ONNX ``--precision fp16``).

The gate: after the exact LayerNorm rescaling, a value the fp16 graph would hold above
``65504 / 2`` (headroom 2) is refused with its layer's name, unless the exporter's graph
computes that quantity in fp32 (ONNX: the sums of means). Shown on a one-convolution model
whose output is set by its bias, so the value sits just inside or just past the limit, and
on a real ESC export whose output convolution overflows.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export import onnx_export as ox
from export.calibration import guard_fp16
from models.fp16_safety import FP16_MAX, Fp16UnsafeError
from runtimes.imageio import Image, write_image

REPO = Path(__file__).resolve().parents[1]
LIMIT = FP16_MAX / 2          # the default headroom x2


@pytest.fixture()
def grey_pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "pictures"
    folder.mkdir()
    write_image(folder / "grey.png", Image(np.full((12, 12, 3), 0.5, np.float32), None, "RGB", 8))
    return folder


class MeanOfConv(nn.Module):
    """A 1x1 convolution whose output is its bias (zero weights), then a spatial mean."""

    def __init__(self, bias: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y - y.mean(dim=(-2, -1), keepdim=True)


def test_an_output_just_past_the_limit_is_refused_by_name_and_just_inside_passes(grey_pictures: Path) -> None:
    # One pixel: the mean's sum is the value itself, so only the output is near the limit.
    _, safety = guard_fp16(MeanOfConv(0.99 * LIMIT), grey_pictures, (1, 1), ox.ONNX_FP32_QUANTITIES)
    assert safety.report.safe and safety.summary().startswith("fp16-safe on 1 picture(s)")
    with pytest.raises(Fp16UnsafeError, match=r"conv: output of conv2d reaches 3\.3\d+e\+04"):
        guard_fp16(MeanOfConv(1.01 * LIMIT), grey_pictures, (1, 1), ox.ONNX_FP32_QUANTITIES)


def test_a_mean_whose_sum_overflows_passes_only_where_the_graph_sums_in_fp32(grey_pictures: Path) -> None:
    """8x8 pixels of 0.9 x limit / 32: the values fit, their sum (1.8 x limit) does not."""
    model = MeanOfConv(0.9 * LIMIT / 32)
    _, safety = guard_fp16(model, grey_pictures, (8, 8), ox.ONNX_FP32_QUANTITIES)
    assert safety.in_fp32 and "sum before mean" in safety.in_fp32[0]
    assert "computed in fp32 by the graph" in safety.summary()
    with pytest.raises(Fp16UnsafeError, match="sum before mean"):
        guard_fp16(model, grey_pictures, (8, 8))       # a target that sums in fp16 (Core ML) refuses it


def test_onnx_fp16_export_runs_the_guard_and_says_so(tiny_checkpoint: Path, grey_pictures: Path,
                                                     tmp_path: Path) -> None:
    from models import load_model

    model = load_model(tiny_checkpoint)
    report = ox.export_onnx(model, tmp_path / "tiny_fp16.onnx", precision="fp16", shape=(16, 16), batch=1,
                            calibration_images=grey_pictures)
    row = dict(report.summary_rows())["fp16 safety"]
    assert row.startswith("fp16-safe on 1 picture(s)") and f"{grey_pictures} at 16x16" in row
    with pytest.raises(ox.OnnxExportError, match="calibration pictures record ranges for the fp16"):
        ox.export_onnx(model, tmp_path / "fp32.onnx", calibration_images=grey_pictures)
    with torch.no_grad():
        model.to_img.bias.fill_(1.01 * LIMIT)
    with pytest.raises(ox.OnnxExportError, match=r"fp16 safety: .*to_img: output of .*--precision fp32"):
        ox.export_onnx(model, tmp_path / "loud.onnx", precision="fp16", shape=(16, 16), batch=1,
                       calibration_images=grey_pictures)
    assert not (tmp_path / "loud.onnx").exists()


def test_cli_flag_reaches_the_guard(tiny_checkpoint: Path, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), "--weights", str(tiny_checkpoint),
                          "--precision", "fp16", "--shape", "16x16", "--batch", "1", "--calibration-images",
                          str(tmp_path / "missing"), "-o", str(tmp_path / "x.onnx")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode != 0 and "no calibration picture or folder at" in run.stderr, run.stderr[-1500:]
    assert "Traceback" not in run.stderr and not (tmp_path / "x.onnx").exists()
