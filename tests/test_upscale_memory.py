"""benchmarks/upscale_memory.py: its bookkeeping (agreement, table, refusals), not its figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks import upscale_memory as um


def test_agreement_counts_levels_and_identical_values() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0], b[1, 1, 1] = 1, 255  # uint8 wrap-around must not hide a 255-level difference
    got = um.agreement(a, b)
    assert got["max_levels"] == 255 and got["identical"] == pytest.approx(46 / 48)
    assert um.agreement(a, a) == {"max_levels": 0, "identical": 1.0}


def test_table_names_a_failed_runtime() -> None:
    result = {"image": "x/OST_009.png", "size": "64x64", "weights": "w/esc.pth", "date": "2026-12-03", "rows": [
        {"runtime": "torch", "exit": 0, "wall_s": 1.0, "peak_rss_bytes": 2**30, "plan": "tiling: whole image"},
        {"runtime": "openvino", "exit": 137, "wall_s": 2.0, "peak_rss_bytes": 3 * 2**30, "plan": None},
        {"runtime": "onnxruntime", "exit": 0, "wall_s": 1.5, "peak_rss_bytes": 2**29, "plan": "tiling: tile 32",
         "vs_torch": {"max_levels": 1, "identical": 0.995}}]}
    text = um.markdown(result)
    assert "| openvino (failed: exit 137) | 3.00 GiB |" in text
    assert "| onnxruntime | 0.50 GiB | 2 s | tiling: tile 32 | max 1 levels, 99.50% identical |" in text


def test_bad_flags_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(b"")
    with pytest.raises(SystemExit) as missing:
        um.main(["--weights", str(tmp_path / "none.pth"), "--image", str(image)])
    assert missing.value.code == 2 and "none.pth does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as unknown:
        um.main(["--weights", str(image), "--image", str(image), "--runtimes", "torch,tensorflow"])
    assert unknown.value.code == 2 and "unknown runtime(s) tensorflow" in capsys.readouterr().err
