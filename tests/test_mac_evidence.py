"""benchmarks/mac_evidence.py: the dry run works end to end on Linux, and nothing in it passes for a Mac figure.

The dry run is the CI check that keeps the one-call Mac script from rotting between Mac
runs: same exports, lint and package opening (``runtimes.load(package, function=...)``)
through the numpy interpreter, with a tiny checkpoint. These tests also show its gates:
without macOS the real run refuses, a row that raised makes the exit status 1, and the
results merge into ``benchmarks.table`` as a column labelled DRY RUN.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from optional_deps import need

need("coremltools", "coremltools is not installed (pip install 'esc-deploy[all]')")

from benchmarks import mac_evidence as me  # noqa: E402
from benchmarks import table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_exports_lints_opens_every_function_and_merges(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "evidence"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mac_evidence.py"), "--dry-run", "--models",
                          "esc", "--presets", "m2", "--weights", f"esc={tiny_checkpoint}", "--out", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "dry-run" and results["note"] == me.DRY_RUN_LABEL
    assert results["machine"]["device_name"].startswith("DRY RUN")
    assert (out / "README.md").read_text().startswith(f"# Core ML evidence -- {me.DRY_RUN_LABEL}")

    (row,) = results["rows"]
    assert (row["model"], row["preset"], row["input_size"], row["runtime"]) == ("esc", "m2", "128x128", "coreml")
    assert row["status"] == "skipped" and row["reason"] == me.DRY_RUN_LABEL   # no Apple figure is invented
    assert not {"latency_median_ms", "compile_ms", "cost_share"} & row.keys()
    assert row["lint_ok"] and row["transposes"] == {"main": 3} and row["transposes_per_attention_block"] == {"main": 3}
    assert max(row["largest_intermediate_bytes"].values()) <= 8 * 2**20
    assert row["opened"] == "coreml-interpreter" and row["interpreter_psnr_vs_torch_db"] > 50
    assert row["fp16_safety"].startswith("fp16-safe")

    (package,) = results["packages"]
    assert package["status"] == "ok" and package["lint_ok"]
    functions = {f["function"]: f for f in package["functions"]}
    assert set(functions) == {"tile_128x128", "tile_256x256"}  # the multifunction package opens, every function
    assert all(f["opened"] == "coreml-interpreter" and f["interpreter_psnr_vs_torch_db"] > 50
               for f in functions.values())

    merged = table.merge([out / "results.json"], references=())
    (column,) = merged.columns
    assert column.device.startswith("DRY RUN") and column.input_size == "128x128"
    assert merged.cell("esc", column).status == "skipped"
    assert "not run: DRY RUN" in table.to_markdown(merged)


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the refusal off macOS; this is macOS")
def test_real_run_refuses_off_macos(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mac_evidence.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--dry-run" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "results.json").exists()


def test_bad_options_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, message in [(["--models", "esc_xl"], "--models takes esc, esc_light"),
                          (["--weights", "esc_light=x.pth", "--models", "esc"], "--weights takes MODEL=PATH"),
                          (["--repeat", "5"], "--repeat must be >= 10")]:
        with pytest.raises(SystemExit) as exit_info:
            me.parse_args(["--out", str(tmp_path), *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_row_that_raised_fails_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("coremltools could not convert the model")

    monkeypatch.setattr(me, "export_package", broken)
    assert me.main(["--dry-run", "--models", "esc", "--presets", "iphone", "--random-weights",
                    "--no-default-packages", "--out", str(tmp_path)]) == 1
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["status"] == "failed" and "could not convert" in row["reason"] and row["input_size"] == "32x32"
