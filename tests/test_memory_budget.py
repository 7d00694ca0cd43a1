"""runtimes.memory and the budget-driven tiling of ``upscale``: a smaller budget gives
smaller tiles and batches, an explicit ``--tile`` wins, a bad budget is a usage error,
and the per-runtime coefficients are the ones the plan applies."""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtimes import load
from runtimes.base import RunnerError
from runtimes.memory import (
    RUNTIME_COSTS,
    BudgetError,
    default_budget,
    fit_cost,
    image_bytes,
    parse_budget,
    plan_tiles,
)
from runtimes.tiling import _plan_axis_aligned
from runtimes.upscale import budget_arg, main

GIB = 2**30


@pytest.mark.parametrize(("text", "expected"), [
    ("4GB", 4 * 10**9), ("512MB", 512 * 10**6), ("1.5GiB", int(1.5 * GIB)), ("800000000", 800_000_000),
    (" 2 gib ", 2 * GIB), ("64k", 64_000),
])
def test_parse_budget(text: str, expected: int) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 GB RAM", "-1GB", "0MB", "4XB", ""])
def test_parse_budget_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(BudgetError, match="memory budget must be"):
        parse_budget(text)
    with pytest.raises(argparse.ArgumentTypeError, match="memory budget must be"):
        budget_arg(text)


def test_default_budget_is_half_the_available_ram() -> None:
    budget, source = default_budget("cpu")
    assert source == "50% of available RAM" and budget > 0


def test_a_smaller_budget_gives_smaller_tiles_then_smaller_batches() -> None:
    cost = RUNTIME_COSTS["onnxruntime"]
    size, scale = (1024, 768), 4
    base = image_bytes(*size, 1, scale)

    def plan(budget: float):
        return plan_tiles(size, scale, "onnxruntime", int(budget), "test", align=32, context=96)

    whole = plan(base + cost.call_bytes(1024 * 768) * 1.01)
    assert whole.tile is None and whole.batch_size == 1 and whole.overlap == 0
    roomy, tight = plan(base + 8 * GIB), plan(base + 2 * GIB)
    assert roomy.tile is not None and tight.tile is not None and tight.tile < roomy.tile
    for p in (roomy, tight):  # on the window grid; the full context unless the tile is too small for it
        assert p.tile % 32 == 0 and p.overlap == min(96, (p.tile - 32) // 2) and p.estimate <= p.budget
    assert roomy.overlap == 96
    # The tightest budget that still runs: small tiles, whose overlap shrinks to keep a window's stride.
    tiny = plan(base + cost.call_bytes(64 * 64) + 1)
    assert tiny.tile == 64 and tiny.overlap == 16 and tiny.batch_size == 1
    # Many small tiles: the batch grows with the room, up to MAX_BATCH (a runtime that
    # holds memory per call shape, as an unmeasured one is assumed to, runs one tile per call).
    torch_cost = RUNTIME_COSTS["torch"]
    batched = plan_tiles(size, scale, "torch", int(base + 4 * GIB), "test", align=32, context=96, tile=128)
    single = plan_tiles(size, scale, "torch", int(base + torch_cost.call_bytes(128 * 128) * 1.5), "test",
                        align=32, context=96, tile=128)
    assert batched.batch_size == 4 and single.batch_size == 1
    assert plan_tiles(size, scale, "coreml", int(base + 4 * GIB), "test", align=32, context=96,
                      tile=128).batch_size == 1
    with pytest.raises(BudgetError, match="cannot hold this 768x1024 upscale on onnxruntime"):
        plan(base)


def test_the_runtime_coefficient_decides_the_tile() -> None:
    """OpenVINO holds ~8x less per pixel than ONNX Runtime (measured): same budget, larger tiles."""
    kwargs = {"budget": 4 * GIB, "source": "test", "align": 32, "context": 96}
    ov = plan_tiles((2048, 2048), 4, "openvino", **kwargs)
    ort = plan_tiles((2048, 2048), 4, "onnxruntime", **kwargs)
    unknown = plan_tiles((2048, 2048), 4, "coreml", **kwargs)  # not measured: the largest coefficient
    assert ort.tile is not None and (ov.tile is None or ov.tile > ort.tile)
    assert unknown.tile == ort.tile


def test_a_runtime_that_holds_memory_per_shape_is_charged_for_every_tile_shape() -> None:
    """A runtime not measured here is assumed to keep each shape's blocks (as ONNX Runtime's
    arena did): 1000 px with 288-px tiles on the 32-px grid gives 288- and 232-px windows, so
    four shapes are held at the peak. The measured runtimes give memory back after a call."""
    from runtimes.memory import FALLBACK_COST

    assert FALLBACK_COST.per_shape and not any(c.per_shape for c in RUNTIME_COSTS.values())
    p = plan_tiles((1000, 1000), 4, "coreml", 100 * GIB, "test", align=32, context=96, tile=288)
    assert p.estimate == pytest.approx(image_bytes(1000, 1000, 1, 4) + FALLBACK_COST.call_bytes((288 + 256) ** 2))
    torch_cost = RUNTIME_COSTS["torch"]
    q = plan_tiles((1000, 1000), 4, "torch", 100 * GIB, "test", align=32, context=96, tile=288, batch_size=1)
    assert q.estimate == pytest.approx(image_bytes(1000, 1000, 1, 4) + torch_cost.call_bytes(288 * 288))


def test_onnx_runtime_sessions_run_without_the_cpu_arena() -> None:
    """The arena kept every tile shape's blocks (7.9 GiB after four shapes of a 1024x1024
    picture); the ONNX Runtime cost in RUNTIME_COSTS assumes it is off."""
    from runtimes.onnx_runner import OnnxModelInfo, _session_options_for

    import onnx

    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["lr"], ["sr"])], "g",
                                   [onnx.helper.make_tensor_value_info("lr", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                                   [onnx.helper.make_tensor_value_info("sr", onnx.TensorProto.FLOAT, [1, 3, 4, 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    assert _session_options_for(OnnxModelInfo(model)).enable_cpu_mem_arena is False


def test_explicit_values_win() -> None:
    p = plan_tiles((1024, 1024), 4, "torch", 1 * GIB, "test", align=32, context=96, tile=200, overlap=20,
                   batch_size=3)
    assert (p.tile, p.overlap, p.batch_size) == (200, 20, 3)


def test_fit_cost_recovers_a_line() -> None:
    fitted = fit_cost([(p, int(5e6 + 3000 * p)) for p in (4096, 16384, 36864)])
    assert (fitted.per_pixel, fitted.per_call) == pytest.approx((3000, 5e6), rel=1e-6)
    assert fitted.per_shape is False


def test_aligned_windows_start_on_the_grid_and_keep_their_context() -> None:
    for length, window, overlap in [(1024, 480, 96), (300, 224, 96), (97, 64, 16), (1000, 128, 48)]:
        spans = _plan_axis_aligned(length, window, overlap, 32)
        assert all(s.start % 32 == 0 for s in spans)
        assert spans[0].keep_start == 0 and spans[-1].keep_end == length
        assert all(a.keep_end == b.keep_start for a, b in itertools.pairwise(spans))
        assert spans[-1].start + spans[-1].size == length and all(s.size <= window for s in spans)
        for s in spans:  # every kept pixel has `overlap` pixels of context, except at the image edges
            assert s.keep_start == 0 or s.keep_start - s.start >= overlap
            assert s.keep_end == length or s.start + s.size - s.keep_end >= overlap
    with pytest.raises(ValueError, match="leaves no 32-pixel step"):
        _plan_axis_aligned(300, 100, 40, 32)


# ----------------------------------------------------------------------------------
# The runner and the CLI
# ----------------------------------------------------------------------------------


class Recorder(nn.Module):
    """Nearest x2 that records each call's shape (any size runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return F.interpolate(x, scale_factor=2, mode="nearest")


def test_runner_upscale_follows_the_budget() -> None:
    model = Recorder()
    runner = load(model, scale=2)
    x = torch.rand(1, 3, 300, 200)
    # Nearest copies pixels, so any tiling gives the same values; 1e-6 (a few float32 ulps at 1.0) leaves room
    # only for rounding noise, while a misplaced tile is off by ~0.1 or more.
    torch.testing.assert_close(runner.upscale(x), F.interpolate(x, scale_factor=2, mode="nearest"),
                               atol=1e-6, rtol=0)
    assert model.calls == [(1, 3, 300, 200)]  # default budget: the whole image in one call
    model.calls.clear()
    cost = RUNTIME_COSTS["torch"]
    budget = int(image_bytes(300, 200, 1, 2) + cost.call_bytes(100 * 100))
    plan = runner.plan_tiles((300, 200), memory_budget=budget)
    assert plan.tile is not None and plan.tile <= 100 and plan.runtime == "torch"
    out = runner.upscale(x, memory_budget=budget)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode="nearest"), atol=1e-6, rtol=0)
    assert max(max(c[2], c[3]) for c in model.calls) == plan.tile
    with pytest.raises(RunnerError, match="cannot hold this 200x300 upscale on torch"):
        runner.upscale(x, memory_budget=1000)


def write_png(path: Path, h: int, w: int) -> Path:
    from PIL import Image

    pixels = (torch.rand(h, w, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def tiling_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("tiling: "))


def test_cli_says_what_it_chose_and_a_tight_budget_tiles(tiny_checkpoint: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = write_png(tmp_path / "in.png", 200, 240)
    assert main([str(src), str(tmp_path / "a.png"), "--artifact", str(tiny_checkpoint), "--quiet"]) == 0
    assert tiling_line(capsys.readouterr().err).startswith("tiling: whole image per call, batch 1 (torch:esc-sdpa: ~")
    assert main([str(src), str(tmp_path / "b.png"), "--artifact", str(tiny_checkpoint), "--quiet",
                 "--memory-budget", "150MB"]) == 0
    line = tiling_line(capsys.readouterr().err)
    tile = int(line.split("tile ")[1].split(",")[0])
    assert tile < 240 and tile % 8 == 0 and "of a 143.1 MiB budget, memory_budget given" in line


def test_torch_cost_follows_the_attention_back_end(tiny_checkpoint: Path) -> None:
    """ESC with SDPA runs the flash kernel (measured ~4 KB per pixel); naive attention holds the
    score matrices (~42 KB), so the same budget gives it smaller tiles."""
    sdpa, naive = load(tiny_checkpoint), load(tiny_checkpoint, attention="naive")
    assert (sdpa.memory_cost_key, naive.memory_cost_key) == ("torch:esc-sdpa", "torch")
    budget = int(image_bytes(1024, 1024, 1, 2) + RUNTIME_COSTS["torch"].call_bytes(256 * 256))
    small, large = (r.plan_tiles((1024, 1024), memory_budget=budget) for r in (naive, sdpa))
    assert small.tile is not None and small.tile <= 256 and (large.tile is None or large.tile > 2 * small.tile)


def test_cli_explicit_tile_wins_over_the_budget(tiny_checkpoint: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = write_png(tmp_path / "in.png", 200, 240)
    assert main([str(src), str(tmp_path / "a.png"), "--artifact", str(tiny_checkpoint), "--quiet", "--tile", "64",
                 "--memory-budget", "100GB"]) == 0
    assert tiling_line(capsys.readouterr().err).startswith("tiling: tile 64, overlap 28, batch 4")


def test_cli_bad_budget_is_a_usage_error(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_png(tmp_path / "in.png", 20, 20)
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), str(tmp_path / "a.png"), "--artifact", str(tiny_checkpoint), "--memory-budget", "lots"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--memory-budget: memory budget must be a size such as 4GB" in err
    assert main([str(src), str(tmp_path / "a.png"), "--artifact", str(tiny_checkpoint), "--memory-budget", "1KB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a memory budget of 1000 B cannot hold") and "raise --memory-budget" in err
    assert not (tmp_path / "a.png").exists()
