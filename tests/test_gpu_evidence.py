"""benchmarks/gpu_evidence.py: the dry run works end to end, and nothing in it passes for GPU evidence.

The dry run is the CI check that keeps the one-call GPU script from rotting between the
short spells a GPU is lent: same code, CPU, tiny shapes, Triton's interpreter. These
tests also show its gates failing: a skipped test is never a pass, a row that raised
makes the exit status 1, and without a GPU the real run refuses.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_evidence as ge

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_labelled_tables(tmp_path: Path) -> None:
    out = tmp_path / "evidence"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_evidence.py"), "--dry-run", "--out",
                          str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert {p.name for p in out.iterdir()} >= {"environment.json", "tests.json", "tests.xml", "kernel.json",
                                                 "models.json", "README.md"}
    payloads = {name: json.loads((out / f"{name}.json").read_text()) for name in
                ("environment", "tests", "kernel", "models")}
    assert all(p["mode"] == "dry-run" and "no figure here is a GPU figure" in p["note"] for p in payloads.values())
    assert (out / "README.md").read_text().startswith(f"# GPU evidence -- {ge.DRY_RUN_LABEL}")

    tests = payloads["tests"]["data"]
    assert tests["skipped"] >= 7 and tests["passed"] == 0   # GPU tests cannot run on a CPU...
    assert tests["status"].startswith("INCOMPLETE")         # ...and their skips are not a pass

    kernel = payloads["kernel"]["data"]
    assert {r["method"] for r in kernel} == set(ge.KERNEL_METHODS)
    assert len(kernel) == len(ge.KERNEL_METHODS) * 2          # two sizes
    for row in kernel:
        assert row["status"] == "ok", row
        assert row["peak_mib"] is None and row["timer"] == "wall clock (CPU)"   # no GPU figure is invented
        assert row["median_ms"] > 0
    # Exact methods agree with the fp32 reference within bf16 rounding (8 significant bits on |out| < ~4).
    for row in kernel:
        if not row["method"].startswith("flashbias"):
            assert math.isfinite(row["max_abs_err"]) and row["max_abs_err"] < 5e-2, row

    models = payloads["models"]["data"]["rows"]
    esc = [r for r in models if r["backend"] != "-"]
    assert {r["backend"] for r in esc} == {"fused", "sdpa", "flex", "naive"} and all(r["status"] == "ok" for r in esc)
    peers = [r for r in models if r["backend"] == "-"]
    assert {r["model"] for r in peers} == set(ge.PEERS)
    assert all(r["status"] == "ok" or r["status"].startswith("not measured") for r in peers)

    trt = json.loads((out / "tensorrt.json").read_text())["data"]   # no engine on a CPU, and it says so
    assert trt == {"status": "skipped: dry run (engines need TensorRT and a GPU)", "rows": []}
    assert "## TensorRT engines: skipped: dry run" in (out / "README.md").read_text()

def test_a_skipped_test_is_never_a_pass(tmp_path: Path) -> None:
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="gpu"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.a" name="bad"><failure message="assert 1 == 2"/></testcase>'
        "</testsuite></testsuites>")
    cases = ge.parse_junit(xml)
    assert [c["outcome"] for c in cases] == ["passed", "skipped", "failed"]
    assert cases[1]["detail"] == "needs CUDA"
    assert ge.tests_status({"passed": 3, "failed": 0, "skipped": 0}) == "passed"
    assert ge.tests_status({"passed": 3, "failed": 0, "skipped": 1}).startswith("INCOMPLETE")
    assert ge.tests_status({"passed": 3, "failed": 1, "skipped": 0}) == "FAILED"
    assert ge.tests_status({"passed": 0, "failed": 0, "skipped": 0}) == "NOTHING RAN"


def test_a_row_that_raised_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error row (here: every ESC model fails to build) gives exit status 1, and the table says why."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # main sets it for the dry run; restored after the test
    monkeypatch.setattr(ge, "kernel_table", lambda plan, budget: [])

    def broken(variant: str, backend: str, plan: ge.Plan, bias: str = "table") -> None:
        raise RuntimeError(f"cannot build {variant}")

    monkeypatch.setattr(ge, "_model", broken)
    monkeypatch.setattr(ge, "PEERS", ())
    assert ge.main(["--dry-run", "--skip-tests", "--out", str(tmp_path)]) == 1
    rows = json.loads((tmp_path / "models.json").read_text())["data"]["rows"]
    assert rows and all(r["status"] == "error" and "cannot build" in r["error"] for r in rows)


def test_ratios_and_paper_figures() -> None:
    rows = [{"model": "esc", "backend": "fused", "precision": "fp16", "status": "ok", "median_ms": 10.0,
             "peak_mib": 100.0},
            {"model": "swinir_light", "backend": "-", "precision": "fp16", "status": "ok", "median_ms": 100.0,
             "peak_mib": 400.0},
            {"model": "esc", "backend": "sdpa", "precision": "fp32", "status": "ok", "median_ms": 20.0,
             "peak_mib": 100.0}]   # no fp32 SwinIR-light row: no ratio for it
    (ratio,) = ge.ratios(rows)
    assert ratio["latency_ratio"] == pytest.approx(0.1) and ratio["memory_ratio"] == pytest.approx(0.25)
    assert ratio["paper_latency_ratio"] == pytest.approx(21.9 / 222.9)
    assert ge.paper_key({"model": "esc_real", "backend": "flashbias"}) == "esc_real/flashbias"
    # The FlashBias form's figure whatever back-end runs it; a table model's by its back-end.
    assert ge.paper_key({"model": "esc_real", "bias": "flashbias r48", "backend": "sdpa"}) == "esc_real/flashbias"
    assert ge.paper_key({"model": "esc_real", "bias": "table", "backend": "flex"}) == "esc_real/flex"
    # FlashBias-form rows are not ESC/SwinIR ratios (the paper's ratio is for the table model).
    assert ge.ratios([{**rows[0], "bias": "flashbias r48"}, rows[1]]) == []
    assert ge.PAPER_FIGURES[ge.paper_key({"model": "esc_real", "backend": "flex"})]["ms"] == 59.9


def test_real_run_refuses_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for CPU machines")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_evidence.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--dry-run" in run.stderr and "Traceback" not in run.stderr
    small = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_evidence.py"), "--out", str(tmp_path),
                            "--repeat", "5"], capture_output=True, text=True, timeout=300)
    assert small.returncode == 2 and "--repeat must be >= 20" in small.stderr


def test_spent_budget_leaves_rows_unmeasured_not_faked() -> None:
    rows = ge.model_table(ge.Plan.tiny(), ge.Budget(0))
    assert rows and all(r["status"].startswith("not measured: time budget") for r in rows)
    assert not any("median_ms" in r or "peak_mib" in r for r in rows)


def test_tensorrt_rows_say_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where TensorRT imports but cannot build (here: no GPU), each engine row says why; none is an error."""
    from types import SimpleNamespace

    from export import trt_build as tb

    def refuse(model, output, **options):
        raise tb.TrtEnvironmentError(SimpleNamespace(path=output), [f"no CUDA GPU ({options['attention']})"])

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.13.0.35"))
    monkeypatch.setattr(tb, "build_trt_engine", refuse)
    plan = ge.Plan.gpu(30)
    trt = ge.tensorrt_table(plan, ge.Budget(60), tmp_path)
    assert trt["status"] == "TensorRT 10.13.0.35"
    assert [(r["precision"], r["attention"], r["status"]) for r in trt["rows"]] == [
        (p, a, f"not measured: no CUDA GPU ({a})") for p, a in ge.TRT_BUILDS]
    assert "| esc | native | fp16 |" in ge.tensorrt_markdown(trt)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert ge.tensorrt_table(plan, ge.Budget(60), tmp_path)["status"].startswith("skipped: TensorRT does not import")
    assert ge.tensorrt_table(ge.Plan.tiny(), ge.Budget(60), tmp_path)["status"].startswith("skipped: dry run")
