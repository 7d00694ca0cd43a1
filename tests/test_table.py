"""benchmarks.table: merging results from several machines into one honest table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import table as bt


def _results(path: Path, device: str, rows: list[dict], weights: str = "random") -> Path:
    machine = {"hostname": f"host-{device}", "device_name": device, "date": "2026-12-01T10:00:00+00:00",
               "weights": weights, "versions": {"torch": "2.13.0", "onnxruntime": "1.32.0"}}
    path.write_text(json.dumps({"machine": machine, "config": {}, "rows": rows}))
    return path


def _row(model: str, runtime: str, size: str, status: str = "ok", latency: float | None = 10.0,
         memory: float | None = 5.0, reason: str = "", precision: str = "fp32") -> dict:
    return {"model": model, "runtime": runtime, "precision": precision, "input_size": size, "status": status,
            "latency_median_ms": latency, "peak_memory_mb": memory, "reason": reason}


@pytest.fixture
def three_files(tmp_path: Path) -> list[Path]:
    cpu = _results(tmp_path / "cpu.json", "Xeon 2-core", [
        _row("esc", "onnxruntime", "128x128", latency=400.0, memory=250.0),
        _row("esc_light", "onnxruntime", "128x128", latency=200.0, memory=120.0),
        _row("swinir_light", "onnxruntime", "128x128", status="failed", latency=None, memory=None,
             reason="export failed: unsupported op"),
    ])
    gpu = _results(tmp_path / "gpu.json", "H100", [
        _row("esc", "torch", "320x180", latency=12.5, memory=300.0),
        _row("swinir_light", "torch", "320x180", status="OOM", latency=None, memory=None, reason="CUDA out of memory"),
    ])
    cpu_big = _results(tmp_path / "cpu_big.json", "Xeon 2-core", [
        _row("esc", "onnxruntime", "512x512", latency=6400.0, memory=900.0),
    ])
    return [cpu, gpu, cpu_big]


def test_merge_columns_cells_statuses_and_sizes_apart(three_files: list[Path]) -> None:
    table = bt.merge(three_files)
    measured = [c for c in table.columns if not c.reference]
    assert {c.header for c in measured} == {
        "Xeon 2-core · onnxruntime · fp32 @ 128x128",
        "Xeon 2-core · onnxruntime · fp32 @ 512x512",   # same device and runtime, other size: its own column
        "H100 · torch · fp32 @ 320x180",
    }
    by_header = {c.header: c for c in table.columns}
    small, big = by_header["Xeon 2-core · onnxruntime · fp32 @ 128x128"], by_header["Xeon 2-core · onnxruntime · fp32 @ 512x512"]
    assert table.cell("esc", small).latency_ms == 400.0 and table.cell("esc", big).latency_ms == 6400.0
    assert table.cell("esc_light", big) is None
    gpu = by_header["H100 · torch · fp32 @ 320x180"]
    assert table.cell("swinir_light", gpu).status == "OOM"
    assert table.cell("swinir_light", small).status == "failed"
    assert table.models == ["esc_light", "esc", "swinir_light"]

    md = bt.to_markdown(table)
    header = md.splitlines()[0]
    assert "paper: RTX 4090 · torch · fp32 @ 320x180" in header
    esc_line = next(line for line in md.splitlines() if line.startswith("| esc |"))
    assert "400.0 ms / 250 MB" in esc_line and "6,400.0 ms / 900 MB" in esc_line and "12.5 ms / 300 MB" in esc_line
    swin_line = next(line for line in md.splitlines() if line.startswith("| swinir_light |"))
    assert "OOM[^" in swin_line and "Failed[^" in swin_line and "222.9 ms / 351 MB" in swin_line
    assert "[^1]: export failed: unsupported op" in md or "[^2]: export failed: unsupported op" in md
    assert "weights: random" in md


def test_a_column_every_model_skipped_is_one_line(tmp_path: Path) -> None:
    """A precision this machine cannot run (bf16 without the instructions) is said once, not as a column of
    "skipped" cells; a column with one skipped and one measured cell stays a column."""
    path = _results(tmp_path / "cpu.json", "EPYC 2-core", [
        _row("esc", "openvino", "128x128", latency=900.0),
        _row("esc", "openvino", "128x128", precision="bf16", status="skipped", latency=None, memory=None,
             reason="no bf16 instructions"),
        _row("esc_light", "openvino", "128x128", precision="bf16", status="skipped", latency=None, memory=None,
             reason="no bf16 instructions"),
        _row("esc", "onnxruntime", "128x128", precision="int8", status="skipped", latency=None, memory=None,
             reason="not quantised"),
        _row("esc_light", "onnxruntime", "128x128", precision="int8", latency=500.0),
    ])
    md = bt.to_markdown(bt.merge([path], references=[]))
    header = md.splitlines()[0]
    assert "openvino · bf16" not in header and "onnxruntime · int8" in header and "openvino · fp32" in header
    assert "- not run: EPYC 2-core · openvino · bf16 @ 128x128: no bf16 instructions" in md
    assert "not run: EPYC 2-core · onnxruntime · int8" not in md


def test_reference_columns_are_never_mixed_with_measured(three_files: list[Path]) -> None:
    table = bt.merge(three_files)
    refs = [c for c in table.columns if c.reference]
    assert refs and all(c.header.startswith("paper: ") for c in refs)
    gpu_measured = next(c for c in table.columns if c.header == "H100 · torch · fp32 @ 320x180")
    paper = next(c for c in refs if c.device == "RTX 4090" and c.runtime == "torch")
    assert table.cell("esc", gpu_measured).latency_ms == 12.5
    assert table.cell("esc", paper).latency_ms == 21.9
    # A paper column appears only for models measured somewhere: esc_fp was not.
    assert "esc_fp" not in table.models
    assert not [c for c in bt.merge(three_files, references=()).columns if c.reference]


def test_same_model_in_the_same_column_twice_is_refused(tmp_path: Path) -> None:
    a = _results(tmp_path / "a.json", "H100", [_row("esc", "torch", "320x180")])
    b = _results(tmp_path / "b.json", "H100", [_row("esc", "torch", "320x180", latency=99.0)])
    with pytest.raises(bt.TableError, match="measured in both"):
        bt.merge([a, b])


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read results"),
    (json.dumps({"rows": []}), "no 'machine' block"),
    (json.dumps({"machine": {}, "rows": [{"model": "esc"}]}), "row 0 lacks"),
    (json.dumps({"machine": {}, "rows": [_row("esc", "torch", "8x8", status="great")]}), "unknown status"),
])
def test_malformed_results_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(bt.TableError, match=message):
        bt.merge([path])
    assert bt.main([str(path)]) == 2


def test_cli_writes_markdown_and_plot(three_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged"
    assert bt.main([*map(str, three_files), "--out", str(out)]) == 0
    assert (out / "table.md").read_text().startswith("| model |")
    assert (out / "latency.png").stat().st_size > 1000


def test_readme_block_replacement(tmp_path: Path) -> None:
    text = f"intro\n{bt.README_START}\nold\n{bt.README_END}\noutro\n"
    new = bt.replace_readme_block(text, "| new |\n")
    assert new == f"intro\n{bt.README_START}\n| new |\n{bt.README_END}\noutro\n"
    with pytest.raises(bt.TableError, match="no table markers"):
        bt.replace_readme_block("no markers here", "x")


def test_a_benchmark_run_machine_block_has_every_provenance_field(tmp_path: Path) -> None:
    """What benchmarks/run.py writes (measure.machine_info) is enough to head a column: no '?' guesses."""
    from benchmarks.measure import machine_info

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"machine": machine_info("cpu"), "config": {},
                                "rows": [_row("esc", "openvino", "128x128", precision="bf16")]}))
    provenance, _ = bt.read_results(path)
    assert set(provenance) == set(bt.PROVENANCE_FIELDS)
    assert all(value != "?" for value in provenance.values()), provenance
    assert provenance["weights"] == "random" and "cores" in provenance["device_name"]
    assert "openvino" in provenance["versions"] or "torch" in provenance["versions"]
    header = bt.merge([path], references=()).columns[0].header
    assert header.endswith("· openvino · bf16 @ 128x128")


def test_readme_table_matches_the_committed_results() -> None:
    """The README's table is exactly what `python -m benchmarks.table --readme README.md` writes."""
    readme = (bt.ROOT / "README.md").read_text()
    expected = bt.replace_readme_block(readme, bt.to_markdown(bt.merge(bt.default_paths())))
    assert readme == expected, "README table is stale: run `python -m benchmarks.table --readme README.md`"
