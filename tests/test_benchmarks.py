"""benchmarks/run.py: a tiny grid end to end (child processes, outputs, resume, errors).

ESC's windows are 32x32, so 64x64 output at x4 (16x16 input) is the smallest honest size.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from benchmarks import run as bench
from benchmarks.report import COLUMNS

TINY = ["--models", "esc_light", "--runtimes", "torch,onnxruntime", "--output-size", "64x64",
        "--warmup", "0", "--repeat", "1", "--scale", "4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("bench")
    argv = TINY + ["--out", str(out), "--cache-dir", str(out / "cache")]
    assert bench.main(argv) == 0
    return out, argv


def test_outputs_have_expected_rows_and_columns(tiny_run: tuple[Path, list[str]]) -> None:
    out, _ = tiny_run
    for name in ("results.csv", "results.json", "results.md", "latency.png", "latency_vs_params.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    # What benchmarks.table needs to merge this file honestly (issue 16).
    assert {"cpu", "cpu_count", "versions", "date", "machine", "device_name", "weights"} <= set(data["machine"])
    assert data["machine"]["weights"] == "random" and data["machine"]["matmul_gflops"]["fp32"] > 0
    rows = data["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == [("esc_light", "torch"), ("esc_light", "onnxruntime")]
    torch_row = rows[0]
    assert torch_row["status"] == "ok", torch_row.get("reason")
    assert torch_row["input_size"] == "16x16" and torch_row["output_size"] == "64x64"
    assert torch_row["params"] > 100_000 and torch_row["flops_g"] > 0
    assert torch_row["latency_median_ms"] > 0 and {"latency_p10_ms", "latency_p90_ms"} <= set(torch_row)
    assert torch_row["peak_memory_mb"] is not None and torch_row["torch_version"]
    assert torch_row["weights"] == "random" and torch_row["precision"] == "fp32"
    # Roofline: GFLOP/s = FLOPs / latency; x floor = latency / (FLOPs at the run's matmul rate).
    rate = data["machine"]["matmul_gflops"]["fp32"]
    assert torch_row["achieved_gflops"] == pytest.approx(torch_row["flops_g"] / torch_row["latency_median_ms"] * 1e3,
                                                         rel=0.01)
    assert torch_row["floor_ratio"] == pytest.approx(rate / torch_row["achieved_gflops"], rel=0.02)
    assert torch_row["memory_bytes_per_input_pixel"] >= 0
    # The ONNX row is ok, or a failed row that says why (e.g. the exporter is missing).
    assert rows[1]["status"] in ("ok", "failed") and (rows[1]["status"] == "ok" or rows[1]["reason"])
    with open(out / "results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        assert len(list(reader)) == 2
    md = (out / "results.md").read_text()
    assert "| model | params | FLOPs (G) | runtime | precision | latency ms | memory MB |" in md
    assert "| esc_light |" in md


def test_resume_keeps_finished_rows(tiny_run: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, argv = tiny_run
    first = json.loads((out / "results.json").read_text())
    before = first["rows"]

    def no_child(*args, **kwargs):  # any measurement would be a resume bug
        raise AssertionError("resume measured a finished row again")

    monkeypatch.setattr(bench, "run_child", no_child)
    # A resumed run measures the matmul rate again (here a very different one): the file keeps
    # the floor its kept rows were compared with and records the new figure beside it.
    monkeypatch.setattr(bench, "matmul_rate_gflops", lambda: 1.5)
    assert bench.main(argv + ["--no-plots"]) == 0
    assert "0 row(s) measured, 2 kept" in capsys.readouterr().out
    resumed = json.loads((out / "results.json").read_text())
    after = resumed["rows"]
    assert [r["timestamp"] for r in after] == [r["timestamp"] for r in before]
    assert resumed["machine"]["matmul_gflops"] == first["machine"]["matmul_gflops"] != {"fp32": 1.5}
    assert resumed["machine"]["matmul_gflops_this_resume"] == {"fp32": 1.5}


def test_peer_row_without_spandrel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("spandrel") is not None:
        monkeypatch.setattr(bench, "probe_spandrel", lambda python=None: "ImportError: simulated")
    monkeypatch.setattr(bench, "run_child", lambda *a, **k: pytest.fail("no child for an unavailable peer"))
    argv = ["--models", "none", "--peers", "swinir_light", "--runtimes", "torch,tensorrt",
            "--output-size", "64x64", "--out", str(tmp_path), "--no-plots"]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["model"] == "swinir_light" and rows[0]["status"] == "failed"
    assert rows[0]["reason"].startswith("spandrel not importable (")
    assert "pip install -e .[peers]" in rows[0]["reason"] and "torchvision" in rows[0]["reason"]
    assert rows[1]["status"] == "skipped" and "CUDA" in rows[1]["reason"]


@pytest.mark.parametrize("flag, value, message", [
    ("--runtimes", "torch,tensorrtt", "unknown runtime(s) tensorrtt; choose from: torch, torch_compile"),
    ("--models", "esc,edsr", "unknown model(s) edsr; choose from: esc, esc_light"),
    ("--output-size", "65x64", "not divisible by --scale 4"),
    ("--precision", "fp32,int4", "unknown precision(s) int4; choose from: fp32, fp16, bf16, int8"),
    ("--peer-python", "/nonexistent/python", "is not an executable file"),
])
def test_bad_flags_exit_2(flag: str, value: str, message: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main([flag, value, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_tensorrt_row_uses_the_exporters_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine comes from export.trt_build.build_trt_engine (as in to_trt.py) at the row's exact shape;
    a machine without TensorRT makes the row 'skipped' with the builder's reason."""
    from types import SimpleNamespace

    from benchmarks import measure
    from export import trt_build

    seen: dict[str, object] = {}

    def no_tensorrt(model: object, output: Path, *, precision: str, profile: trt_build.ShapeProfile) -> None:
        seen.update(output=output, precision=precision, profile=profile)
        raise trt_build.TrtEnvironmentError(SimpleNamespace(path=tmp_path / "x.onnx"), ["tensorrt: pip install it"])

    monkeypatch.setattr(trt_build, "build_trt_engine", no_tensorrt)
    spec = {"model": "esc_light", "scale": 4, "precision": "fp16", "input_wh": [24, 16], "device": "cuda",
            "cache_dir": str(tmp_path)}
    with pytest.raises(measure._Skip, match="tensorrt: pip install it"):
        measure._tensorrt_runner(spec, model=None)
    assert seen["precision"] == "fp16" and seen["output"] == tmp_path / "esc_light_x4_16x24_fp16.engine"
    assert seen["profile"].min == seen["profile"].max == (1, 3, 16, 24)


def test_coreml_row_says_why_it_skips_off_macos() -> None:
    import sys

    from benchmarks.measure import runtime_unavailable

    reason = runtime_unavailable("coreml", "cpu", "fp32")
    if sys.platform == "darwin":
        assert reason is None or "coremltools" in reason
    else:
        assert reason is not None and reason.startswith("Core ML prediction needs macOS")


@pytest.mark.parametrize("runtime, precision, expected", [
    ("torch", "bf16", "slower than fp32"),
    ("onnxruntime", "bf16", "no bf16 Conv/MatMul kernels"),
    ("torch", "int8", "ONNX Runtime and OpenVINO rows only"),
    ("openvino", "bf16", None),
    ("onnxruntime", "int8", None),
])
def test_cpu_precisions_say_why_they_skip(runtime: str, precision: str, expected: str | None) -> None:
    from benchmarks.measure import runtime_unavailable

    reason = runtime_unavailable(runtime, "cpu", precision)
    if expected is None:
        assert reason is None or "not installed" in reason
    else:
        assert reason is not None and expected in reason


def test_onnx_file_per_precision(tmp_path: Path) -> None:
    """OpenVINO lowers the fp32 file itself; int8 rows of both runtimes share one quantised file."""
    from benchmarks.measure import onnx_path_for

    spec = {"cache_dir": str(tmp_path), "input_wh": [32, 16], "model": "esc", "scale": 4}
    names = {(rt, p): onnx_path_for(dict(spec, runtime=rt, precision=p)).name
             for rt in ("onnxruntime", "openvino") for p in ("fp32", "bf16", "fp16", "int8")}
    assert names[("openvino", "bf16")] == names[("openvino", "fp32")] == "esc_x4_16x32_fp32_op18.onnx"
    assert names[("onnxruntime", "int8")] == names[("openvino", "int8")] == "esc_x4_16x32_int8_op18.onnx"
    assert names[("onnxruntime", "fp16")] == "esc_x4_16x32_fp16_op18.onnx"


def test_peer_rows_use_the_peer_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--peer-python: a peer's PyTorch work runs under that interpreter, ESC rows under this one."""
    import sys

    calls: list[tuple[str, str | None]] = []

    def fake_child(spec: dict, timeout: float, python: str | None = None) -> dict:
        calls.append((spec["model"], python))
        return {"status": "failed", "reason": "not measured in this test"}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "probe_spandrel", lambda python=None: None)
    argv = ["--models", "esc_light", "--peers", "span", "--runtimes", "torch", "--output-size", "64x64",
            "--peer-python", sys.executable, "--out", str(tmp_path), "--no-plots"]
    assert bench.main(argv) == 0
    assert calls == [("esc_light", None), ("span", str(Path(sys.executable).absolute()))]


def test_openvino_row_that_would_silently_run_fp32_is_skipped() -> None:
    """OpenVINO ignores a bf16 hint on a CPU without bf16 instructions; that row must not pose as bf16."""
    from types import SimpleNamespace

    from benchmarks import measure

    def runner(got: str) -> SimpleNamespace:
        return SimpleNamespace(compiled=SimpleNamespace(get_property=lambda name: f"<Type: '{got}'>"),
                               close=lambda: None)

    with pytest.raises(measure._Skip, match="runs <type: 'float32'> here when asked for bf16"):
        measure._check_openvino_precision(runner("float32"), "bf16")
    measure._check_openvino_precision(runner("bfloat16"), "bf16")   # honoured: no skip
    measure._check_openvino_precision(runner("float32"), "fp32")


@pytest.mark.parametrize("n", [1, 2, 5, 20])
def test_percentiles_are_numpys_linear_ones(n: int) -> None:
    """The p10 / p90 columns: linear interpolation between order statistics, as numpy's default."""
    import numpy as np

    from benchmarks.measure import _percentile

    samples = list(np.random.default_rng(n).lognormal(size=n))
    for q in (0, 10, 50, 90, 100):
        assert _percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)), rel=1e-12)


def test_flashbias_forms_are_benchmark_models() -> None:
    """``VARIANT+fbR`` rows sit beside the table rows: the same variant in upstream's FlashBias form."""
    import argparse

    from benchmarks.measure import build_torch_model, parse_model_name
    from benchmarks.run import ESC_MODELS, _names

    assert parse_model_name("esc+fb48") == ("esc", 48) and parse_model_name("esc_light") == ("esc_light", 0)
    parser = argparse.ArgumentParser()
    assert _names("esc,esc+fb48", ESC_MODELS, "model(s)", parser) == ["esc", "esc+fb48"]
    for bad in ("sst+fb4", "esc+fb0", "esc_huge+fb8"):   # no table to replace; rank 0; unknown variant
        with pytest.raises(SystemExit):
            _names(bad, ESC_MODELS, "model(s)", parser)
    model, _ = build_torch_model({"family": "esc", "model": "esc_light+fb48", "scale": 4})
    assert model.descriptor.bias == "flashbias rank 48" and model.descriptor.variant == "esc_light"
