"""validation.compare and validation.parity: Set5 x4 parity of an exported esc_light model.

Golden weights are random, so PSNR/SSIM against HR are low; they are reported, never
asserted.  What is asserted is runtime-vs-PyTorch parity and the exit statuses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from conftest import shift_one_pixel_onnx, swap_channels_onnx
from validation.compare import compare, compare_outputs
from validation.parity import THRESHOLDS, main

REPO = Path(__file__).resolve().parents[1]


def scale_output(src: Path, dst: Path, factor: float) -> Path:
    """Copy of ``src`` whose output ``sr`` is multiplied by ``factor`` (a corrupted artifact)."""
    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["sr_raw" if o == "sr" else o for o in node.output]
    graph.initializer.append(helper.make_tensor("corruption", TensorProto.FLOAT, [], [factor]))
    graph.node.append(helper.make_node("Mul", ["sr_raw", "corruption"], ["sr"]))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture(scope="module")
def set5(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "Set5"
    if not path.is_dir():
        pytest.skip(f"missing shared data: {path}")
    return path


@pytest.fixture
def one_image(set5: Path, tmp_path: Path) -> Path:
    """A flat folder holding the smallest Set5 x4 LR image (64x64)."""
    folder = tmp_path / "flat"
    folder.mkdir()
    shutil.copy(set5 / "LR_bicubic" / "X4" / "butterflyx4.png", folder)
    (folder / "README").write_text("not an image: ignored in a flat folder")
    return folder


# ----------------------------------------------------------------------------------
# compare()
# ----------------------------------------------------------------------------------


def test_compare_statistics() -> None:
    ref = np.zeros((1, 3, 10, 10), dtype=np.float32)
    cand = ref.copy()
    cand[0, 1, 2, 3] = 0.5
    cand[0, 0, :, :] += 1e-5
    result = compare(ref, torch.from_numpy(cand), atol=1e-4, name="sr")
    assert not result.passed and result.shape_ok and result.dtype_ok
    assert result.max_abs == pytest.approx(0.5) and result.worst_index == (0, 1, 2, 3)
    assert result.mean_abs == pytest.approx((0.5 + 100 * 1e-5) / 300, rel=1e-3)
    assert result.p99_abs == pytest.approx(1e-5, rel=1e-2)
    mse = (0.25 + 100 * 1e-10) / 300
    assert result.psnr == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert "max abs error 0.5 > atol 0.0001" in result.summary()
    assert json.dumps(result.as_dict())

    same = compare(ref, ref.copy())
    assert same.passed and same.max_abs == 0 and same.psnr == math.inf
    assert json.loads(json.dumps(same.as_dict()))["psnr"] == "inf"


def test_compare_shape_dtype_nonfinite_and_psnr_threshold() -> None:
    ref = np.zeros((2, 3), dtype=np.float32)
    assert "shape mismatch" in compare(ref, np.zeros((3, 2), np.float32)).summary()
    mismatch = compare(ref, np.zeros((2, 3), np.float16))
    assert not mismatch.passed and not mismatch.dtype_ok and "dtype mismatch" in mismatch.summary()
    assert compare(ref, np.zeros((2, 3), np.float16), check_dtype=False).passed
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare(ref, nan).passed and compare(ref, nan).nonfinite == 1
    # NaN in the same place on both sides is a broken model twice, not parity.
    both = compare(nan, nan.copy())
    assert not both.passed and both.nonfinite == 2 and "1 in the reference, 1 in the candidate" in both.summary()
    all_nan = np.full((2, 3), np.nan, np.float32)
    assert not compare(all_nan, all_nan.copy()).passed
    inf = ref.copy()
    inf[1, 2] = np.inf
    assert not compare(inf, inf.copy()).passed and not compare(ref, torch.from_numpy(inf)).passed
    close = ref + 5e-3
    assert compare(ref, close, atol=2e-2).passed  # PSNR 46 dB
    failed = compare(ref, close, atol=2e-2, min_psnr=50.0)
    assert not failed.passed and "PSNR 46.02 dB < 50.00 dB" in failed.summary()
    results = compare_outputs({"sr": ref, "aux": ref}, {"sr": ref})
    assert results["sr"].passed and not results["aux"].passed


def test_thresholds_are_the_documented_ones() -> None:
    assert THRESHOLDS["fp32"].atol == 1e-4 and THRESHOLDS["fp32"].min_psnr is None
    assert THRESHOLDS["fp16"].atol == 2e-2 and THRESHOLDS["fp16"].min_psnr == 50.0
    import validation.parity as parity

    assert "fp32: max abs error <= 1e-4" in parity.__doc__
    assert "fp16: max abs error <= 2e-2 and PSNR(runtime vs PyTorch) >= 50 dB" in parity.__doc__


# ----------------------------------------------------------------------------------
# parity.py
# ----------------------------------------------------------------------------------


def run_parity_cli(*args: object, module: bool = False) -> subprocess.CompletedProcess[str]:
    entry = ["-m", "validation.parity"] if module else [str(Path("validation") / "parity.py")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must fix sys.path itself
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_help_documents_thresholds() -> None:
    for module in (False, True):
        result = run_parity_cli("--help", module=module)
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())
        assert "fp32: max abs error <= 0.0001" in text
        assert "fp16: max abs error <= 0.02 and PSNR >= 50 dB" in text


@pytest.mark.slow
def test_set5_x4_onnx_parity_passes_at_fp32(golden_onnx: Path, checkpoint: Path, set5: Path,
                                           tmp_path: Path) -> None:
    report_path = tmp_path / "parity.json"
    result = run_parity_cli("--artifact", golden_onnx, "--weights", checkpoint, "--dataset", set5,
                            "--scale", 4, "--json", report_path, "--threads", 2)
    print(result.stdout)  # the table, shown with pytest -s
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity PASSED: 5/5 images" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["summary"]["passed"] and report["layout"] == "benchmark" and report["precision"] == "fp32"
    assert report["runtime"]["runner"] == "onnxruntime" and report["reference_runtime"]["runner"] == "torch"
    assert [i["name"] for i in report["images"]] == ["babyx4", "birdx4", "butterflyx4", "headx4", "womanx4"]
    for image in report["images"]:
        assert image["passed"] and image["comparison"]["max_abs"] <= THRESHOLDS["fp32"].atol
        for side in ("runtime", "reference"):  # reported (random weights: low), not judged
            assert isinstance(image[side]["psnr_y"], float) and 0 < image[side]["ssim_y"] <= 1
        assert abs(image["runtime"]["psnr_y"] - image["reference"]["psnr_y"]) < 0.01
    assert report["summary"]["worst_max_abs"] <= THRESHOLDS["fp32"].atol


@pytest.mark.slow
def test_corrupted_artifact_fails(golden_onnx: Path, checkpoint: Path, one_image: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = scale_output(golden_onnx, tmp_path / "scaled_by_1.01.onnx", 1.01)
    report_path = tmp_path / "bad.json"
    code = main(["--artifact", str(bad), "--weights", str(checkpoint), "--dataset", str(one_image),
                 "--scale", "4", "--json", str(report_path), "--threads", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "parity FAILED: 0/1 images" in out and "max abs error" in out
    report = json.loads(report_path.read_text())
    assert report["layout"] == "flat" and not report["summary"]["passed"]
    image = report["images"][0]
    assert image["runtime"]["psnr_y"] is None  # flat folder: no HR metrics
    assert 1e-3 < image["comparison"]["max_abs"] <= 0.011


@pytest.mark.parametrize(("shift", "passed"), [(0.9e-4, True), (1.1e-4, False)], ids=["0.9x-atol", "1.1x-atol"])
def test_parity_verdict_at_the_fp32_bound(golden_onnx: Path, checkpoint: Path, one_image: Path, tmp_path: Path,
                                          shift: float, passed: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """One output pixel off by 10% less / more than the fp32 bound (1e-4): pass / fail."""
    artifact = shift_one_pixel_onnx(golden_onnx, tmp_path / "shifted.onnx", shift)
    code = main(["--artifact", str(artifact), "--weights", str(checkpoint), "--dataset", str(one_image),
                 "--scale", "4", "--threads", "2", "--quiet"])
    out = capsys.readouterr().out
    assert (code == 0) == passed and (("parity PASSED: 1/1" if passed else "parity FAILED: 0/1") in out), out


@pytest.mark.slow
def test_swapped_channels_fail_parity(golden_onnx: Path, checkpoint: Path, one_image: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """An artifact that writes BGR instead of RGB is caught by the parity CLI."""
    bad = swap_channels_onnx(golden_onnx, tmp_path / "bgr.onnx")
    code = main(["--artifact", str(bad), "--weights", str(checkpoint), "--dataset", str(one_image),
                 "--scale", "4", "--threads", "2", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "parity FAILED: 0/1 images" in out and "max abs error" in out


def test_checkpoint_artifact_is_its_own_reference(checkpoint: Path, one_image: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint artifact is compared with its own fp32 CPU model: that is a real comparison of
    the runner's options (here the naive attention against the reference's sdpa), and a reference
    that is not the artifact's weights fails it."""
    code = main(["--artifact", str(checkpoint), "--attention", "naive", "--dataset", str(one_image), "--scale", "4",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parity PASSED: 1/1 images" in out
    # The same network with its last convolution's bias moved by 1e-3: an other reference, a failure.
    sd = torch.load(checkpoint, weights_only=True)
    sd["params_ema"] = {k: v + 1e-3 if k == "to_img.bias" else v for k, v in sd["params_ema"].items()}
    other = tmp_path / "other.pth"
    torch.save(sd, other)
    code = main(["--artifact", str(checkpoint), "--weights", str(other), "--dataset", str(one_image), "--scale", "4",
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "parity FAILED: 0/1 images" in out, out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--artifact", "{onnx}", "--scale", "4"], "--weights is required"),
        (["--artifact", "{ckpt}", "--scale", "2"], "the artifact upscales x4, but --scale 2"),
        (["--artifact", "{ckpt}", "--scale", "4", "--dataset", "{set5}"], "has no LR_bicubic/X4 (found: X2)"),
        (["--artifact", "missing.onnx", "--weights", "{ckpt}", "--scale", "4"], "no such artifact"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, checkpoint: Path, one_image: Path, set5: Path,
                             tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx_file = tmp_path / "x.onnx"
    onnx_file.write_bytes(b"")
    values = {"{onnx}": str(onnx_file), "{ckpt}": str(checkpoint), "{set5}": str(tmp_path / "set5")}
    if "{set5}" in args:  # a benchmark layout without X4
        (tmp_path / "set5" / "LR_bicubic" / "X2").mkdir(parents=True)
    argv = [values.get(a, a) for a in args]
    if "--dataset" not in argv:
        argv += ["--dataset", str(one_image)]
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
