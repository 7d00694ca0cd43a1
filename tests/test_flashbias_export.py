"""FlashBias models export with no bias at all: the mask-free path where no custom plugin is needed.

- ONNX opset 23: one native ``Attention`` node per block with three inputs (q, k, v: no mask),
  no Softmax; ONNX Runtime and OpenVINO reproduce the golden ``sr`` within 1e-4 (golden esc x2).
- ONNX below opset 23: the chunked MatMul/Softmax form (a tiny FlashBias model: the layout,
  not the size, is under test), parity with PyTorch.
- every artifact's metadata says ``esc.bias = flashbias rank R``;
- the TensorRT plugin form is refused with the fix named (``--attention native``), and the
  native form's ONNX is written by ``to_trt --dry-run`` (no TensorRT needed for that step);
- Core ML (both forms) reads the factors' product through ``dense_bias()``: a tiny FlashBias
  package matches PyTorch through the interpreter.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import SHARED_DIR, ArtifactCache
from optional_deps import need

from export import onnx_export as ox
from models import load_model
from models.flashbias import to_flashbias
from runtimes import load
from validation.compare import threshold_for

REPO = Path(__file__).resolve().parents[1]
GOLDEN_FB = SHARED_DIR / "golden_fb"
CASE = "esc_fb_r48_x2_41x58_b1"
TOL = threshold_for("fp32").atol


def attention_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == "Attention"]


def masks(node: onnx.NodeProto) -> int:
    """1 when an ``Attention`` node has its optional 4th input (attn_mask) wired, else 0."""
    return int(len(node.input) > 3 and node.input[3] != "")


@pytest.fixture(scope="module")
def golden_op23(artifacts: ArtifactCache) -> tuple[ox.ExportReport, dict]:
    io = torch.load(GOLDEN_FB / f"{CASE}.io.pt", weights_only=True)

    def build() -> ox.ExportReport:
        model = load_model(GOLDEN_FB / f"{CASE}.pth")
        return ox.export_onnx(model, artifacts.folder(("onnx", CASE, 23)) / "model.onnx", opset=23)

    return artifacts.get(("onnx", CASE, 23), build), io


def test_opset23_has_one_mask_free_attention_per_block(golden_op23) -> None:
    report, _ = golden_op23
    proto = onnx.load(str(report.path))
    nodes = attention_nodes(proto)
    hist = {n.op_type for n in proto.graph.node}
    print(f"{CASE} opset 23: {len(nodes)} Attention nodes, {sum(map(masks, nodes))} masks, "
          f"parity after simplification {report.parity_after:.2e}")
    assert len(nodes) == 5 and sum(map(masks, nodes)) == 0
    assert "Softmax" not in hist
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["esc.bias"] == "flashbias rank 48" and meta["esc.variant"] == "esc"
    assert report.parity_after is not None and report.parity_after <= TOL


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_opset23_reproduces_the_golden_output(golden_op23, runtime: str) -> None:
    report, io = golden_op23
    artifact = report.path if runtime == "onnxruntime" else f"openvino:{report.path}"
    with load(artifact, threads=2) as runner:
        out = runner.upscale(io["lr"])
    err = float((out - io["sr"]).abs().max())
    print(f"{CASE} opset 23 in {runtime}: max abs vs golden sr {err:.2e}")
    assert err <= TOL


@pytest.fixture(scope="module")
def tiny_fb(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    """The tiny ESC (8x8 windows, 1 block) converted at rank 5, as a checkpoint file."""
    converted, _ = to_flashbias(tiny_checkpoint, rank=5)
    path = tmp_path_factory.mktemp("tiny_fb") / "tiny_fb_r5_x2.pth"
    torch.save({"params_ema": converted}, path)
    return path


def test_opset18_chunked_form_matches_pytorch(tiny_fb: Path, tmp_path: Path) -> None:
    model = load_model(tiny_fb)
    report = ox.export_onnx(model, tmp_path / "fb18.onnx", opset=18)
    proto = onnx.load(str(report.path))
    hist = [n.op_type for n in proto.graph.node]
    assert hist.count("Softmax") == ox.DEFAULT_CHUNKS and "Attention" not in hist   # one block, 16 slices
    x = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    got = ox.run_onnx(report.path, x)
    assert float(np.abs(got - expected).max()) <= TOL


@pytest.mark.parametrize("form", ["compat", "ane"])
def test_coreml_package_of_a_flashbias_model_matches_pytorch(tiny_fb: Path, tmp_path: Path, form: str) -> None:
    """Core ML reads the bias through ``dense_bias()`` (the factors' product): both forms, fp32,
    through the interpreter, within the fp32 bound of PyTorch's FlashBias forward."""
    need("coremltools", "Core ML conversion")
    from export import coreml as ce

    cfg = ce.resolve_config(None, None, str(tiny_fb), input_size="16x16", precision="fp32", form=form,
                            output=tmp_path / f"fb_{form}.mlpackage")
    result = ce.export_coreml(cfg)
    model = load_model(tiny_fb)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    res = ce.function_parity(result.path, model, x, "fp32")
    print(f"\nFlashBias tiny model, Core ML {form} form vs PyTorch: {res.summary()}")
    assert res.passed and res.max_abs <= TOL, res
    assert ce.inspect_package(result.path).metadata["esc.bias"].startswith("flashbias rank")


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_plugin_form_is_refused_with_the_fix(tiny_fb: Path, tmp_path: Path) -> None:
    done = _cli(str(REPO / "export" / "to_onnx.py"), "--weights", str(tiny_fb), "--attention", "plugin",
                "-o", str(tmp_path / "plugin.onnx"), cwd=REPO)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "FlashBias" in done.stderr and "--opset 23" in done.stderr
    assert not (tmp_path / "plugin.onnx").exists()


def test_trt_dry_run_writes_the_native_form(tiny_fb: Path, tmp_path: Path) -> None:
    refused = _cli(str(REPO / "export" / "to_trt.py"), "--weights", str(tiny_fb), "--attention", "plugin",
                   "--dry-run", "-o", str(tmp_path / "plugin"), cwd=REPO)
    assert refused.returncode == 2 and "--attention native" in refused.stderr, refused.stdout + refused.stderr
    native = _cli(str(REPO / "export" / "to_trt.py"), "--weights", str(tiny_fb), "--dry-run",
                  "-o", str(tmp_path / "native"), cwd=REPO)   # the default: auto
    assert native.returncode == 0, native.stdout + native.stderr
    assert "--attention native (flashbias rank 5 weights)" in native.stderr
    written = sorted(tmp_path.glob("native*.onnx"))
    assert len(written) == 1, sorted(p.name for p in tmp_path.iterdir())
    proto = onnx.load(str(written[0]))
    nodes = attention_nodes(proto)
    assert len(nodes) == 1 and masks(nodes[0]) == 0
    assert {p.key: p.value for p in proto.metadata_props}["esc.bias"] == "flashbias rank 5"


def test_to_flashbias_cli_converts_and_reports(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny_fb_r8.pth"
    done = _cli(str(REPO / "export" / "to_flashbias.py"), "--weights", str(tiny_checkpoint), "--rank", "8",
                "-o", str(out), "--dataset", str(SHARED_DIR / "data" / "Set5"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert load_model(out).descriptor.bias == "flashbias rank 8"
    for row in ("bias error", "relative (Frobenius) worst", "PSNR baby", "PSNR mean", "5 pictures, Y, 2 px shaved",
                "to_onnx.py --weights"):
        assert row in done.stdout, done.stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--rank", "65"], "between 1 and 64"),
    (["--rank", "8", "--dataset", "no-such-folder"], "dataset folder not found"),
])
def test_to_flashbias_cli_errors_name_the_fix(tiny_checkpoint: Path, tmp_path: Path, extra: list[str],
                                              message: str) -> None:
    out = tmp_path / "out.pth"
    done = _cli(str(REPO / "export" / "to_flashbias.py"), "--weights", str(tiny_checkpoint), "-o", str(out),
                *extra, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_to_flashbias_cli_refuses_a_flashbias_checkpoint(tiny_fb: Path, tmp_path: Path) -> None:
    done = _cli(str(REPO / "export" / "to_flashbias.py"), "--weights", str(tiny_fb), "--rank", "4",
                "-o", str(tmp_path / "again.pth"), cwd=tmp_path)
    assert done.returncode == 2 and "already holds FlashBias factors" in done.stderr, done.stderr
    assert not (tmp_path / "again.pth").exists()
