"""How much memory an upscale may use, and the tile size and batch that fit in it.

Why: an untiled 4K picture through ONNX Runtime on the CPU needs tens of GB (each window
attention materialises its (windows, heads, 1024, 1024) scores), and a 128x128 tile
batched by 4 already costs about 2 GB there.  :func:`plan_tiles` therefore picks the tile
side and the batch from a byte budget and a per-runtime cost per input pixel of one call
(:data:`RUNTIME_COSTS`, measured), instead of a fixed default.

- :func:`parse_budget` reads ``4GB`` / ``512MB`` / ``1.5GiB`` / a plain byte count.
- :func:`default_budget` is a safe fraction of what is free now: available RAM for CPU
  runtimes, free memory of the CUDA device for CUDA ones.
- :func:`measure_call_peak` is how the coefficients were obtained: the peak RSS growth
  of one model call, measured in a fresh child process (run ``python -m runtimes.memory``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["RUNTIME_COSTS", "BudgetError", "RuntimeCost", "TilePlan", "available_ram", "default_budget",
           "format_bytes", "measure_call_peak", "parse_budget", "plan_tiles"]


class BudgetError(ValueError):
    """A memory budget that cannot be read, or that no tile fits in."""


@dataclass(frozen=True)
class RuntimeCost:
    """Peak memory growth of one model call: ``per_call + per_pixel * input pixels of the call``.

    ``per_pixel`` covers a whole batch's pixels (B * h * w); ``per_call`` is what a call
    costs whatever its size (arenas, kernel workspaces). ``per_shape``: the runtime keeps
    a call's working memory after it returns and a call of another shape adds its own
    (an arena that does not give memory back), so the peak is the sum over the shapes.
    """

    per_pixel: float
    per_call: float
    per_shape: bool = False

    def call_bytes(self, pixels: int) -> float:
        return self.per_call + self.per_pixel * pixels


#: Peak RSS growth per model call, by :attr:`runtimes.base.Runner.memory_cost_key`: least-squares
#: lines through one fp32 call (batch 1) of 64x64, 128x128, 192x192 and 256x256 random
#: tiles of the golden esc x4 checkpoint (dim 64, 4 heads, 32x32 windows: every ESC variant
#: but esc_xl), each in a fresh process, VmHWM minus VmRSS before the call
#: (``python -m runtimes.memory ARTIFACT --sides 64 128 192 256``; 2-core Xeon, torch
#: 2.13 CPU, onnxruntime 1.32, OpenVINO 2026.4, 2026-12, other jobs running). Measured:
#: torch 48/42/43/42 KB per pixel (its CPU sdpa with a float bias materialises the
#: scores too); onnxruntime 33/38/44/45 KB, and 46 KB for one 320x320 call; OpenVINO
#: 6.4/6.2/5.9/5.7 KB, but a whole 1024x1024 esc_light x4 upscale peaked at 8.0 GB RSS
#: (7.3 KB per pixel with everything else counted), and the default 1024x1024 run of
#: benchmarks/upscale_memory.py peaked at 7.99 GiB of RSS where 7.6 GiB was planned, so
#: 7.8 KB is used: the plan covers the whole process, interpreter and libraries included.
#: That torch figure is for attention that materialises the scores (naive, or SDPA before
#: it took the flash kernel); it stays the charge for those back-ends and for models not
#: measured. ESC with SDPA now runs the flash kernel on unit-stride q/k/v: 1.8/4.4/3.9/4.1
#: KB per pixel at 128/256/384/512 (golden esc x4, quiet 2-core EPYC, 2026-12-03), so
#: ``torch:esc-sdpa`` is charged 4.4 KB.
#: ONNX Runtime's CPU arena kept what a call reserved, and a call of another shape
#: reserved more: one process running the four tile shapes of a 1024x1024 picture with
#: 288-pixel tiles grew 3.6, 3.6, 6.9, 7.9 GiB after each call, and a default run with
#: 448-pixel tiles was killed by the kernel at 19.1 GB. Sessions now run without the arena
#: (:func:`runtimes.onnx_runner._session_options_for`): five calls of 256x256, 256x224,
#: 224x256, 224x224, 256x256 then held 0.5-0.8 GiB after each with a 1.7 GiB peak
#: (esc_light x4, quiet 2-core EPYC, 2026-12-03). The ONNX cost is that of the
#: attention form in the graph, measured the same way (fresh process per point):
#: chunked (the default below opset 23) 3.2/18.6/15.2/15.8 KB per pixel at 128/256/384/512
#: (esc x4), native opset-23 Attention 31.2/25.7 KB at 256/384 (fit: 21.4 KB + 613 MB),
#: mha 46.8/45.7 KB at 256/384 (fit: 44.8 KB + 124 MB). The charge is the largest of
#: them, since the planner does not know the form: 46.8 KB per pixel + 124 MB per call.
#: Runtimes not measured here (Core ML, TensorRT) use the largest coefficient: an
#: over-estimate, never an under-estimate.
RUNTIME_COSTS: dict[str, RuntimeCost] = {
    "torch": RuntimeCost(per_pixel=41_700.0, per_call=22e6),
    "torch:esc-sdpa": RuntimeCost(per_pixel=4_400.0, per_call=22e6),
    "onnxruntime": RuntimeCost(per_pixel=46_800.0, per_call=124e6),
    "openvino": RuntimeCost(per_pixel=7_800.0, per_call=6e6),
}
FALLBACK_COST = RuntimeCost(per_pixel=max(c.per_pixel for c in RUNTIME_COSTS.values()),
                            per_call=max(c.per_call for c in RUNTIME_COSTS.values()), per_shape=True)

#: Share of the free memory the default budget takes: the rest stays for the OS page
#: cache, other processes and the error of the per-pixel fit.
DEFAULT_FRACTION = 0.5
#: Tiles per call at most: larger batches do not run faster on these runtimes, they only
#: hold more memory.
MAX_BATCH = 4

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(text: str) -> int:
    """``"4GB"`` -> 4e9 bytes; also ``512MB``, ``1.5GiB``, ``800000000``; a ``BudgetError`` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise BudgetError(f"memory budget must be a size such as 4GB, 512MB or 1.5GiB; got {text!r}")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BudgetError(f"memory budget must be more than 0 bytes; got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """``4.2e9`` -> ``'3.9 GiB'`` (binary units, as ``free -h`` shows them)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def available_ram() -> int:
    """Bytes the kernel can give without swapping (``MemAvailable``), or total RAM where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: str) -> tuple[int, str]:
    """(bytes, where they come from): half the free CUDA memory of ``device``, else half the available RAM."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of free {device} memory"
    return int(available_ram() * DEFAULT_FRACTION), f"{DEFAULT_FRACTION:.0%} of available RAM"


@dataclass(frozen=True)
class TilePlan:
    """What :func:`plan_tiles` chose and why; :meth:`describe` is the line the CLI prints.

    ``tile`` is ``None`` for one call per image.  ``estimate`` is the predicted peak
    growth in bytes; ``source`` says where the budget came from.
    """

    tile: int | None
    overlap: int
    batch_size: int
    runtime: str
    budget: int
    estimate: float
    source: str

    def describe(self) -> str:
        tiles = "whole image per call" if self.tile is None else f"tile {self.tile}, overlap {self.overlap}"
        return (f"tiling: {tiles}, batch {self.batch_size} ({self.runtime}: ~{format_bytes(self.estimate)} "
                f"of a {format_bytes(self.budget)} budget, {self.source})")

    def as_dict(self) -> dict[str, Any]:
        return {"tile": self.tile, "overlap": self.overlap, "batch_size": self.batch_size, "runtime": self.runtime,
                "budget_bytes": self.budget, "estimate_bytes": int(self.estimate), "budget_source": self.source}


def image_bytes(height: int, width: int, images: int, scale: int) -> float:
    """Memory held for the whole upscale whatever the tiling: the float32 input, the float32
    output and one clamped copy of it, and the 8-bit picture written from it."""
    return images * height * width * (12 + 24 * scale * scale + 3 * scale * scale)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _axis_plan(length: int, tile: int | None, overlap: int, align: int) -> tuple[int, set[int]]:
    """(number of windows, their distinct sizes) the tiler places along an axis (see
    :mod:`runtimes.tiling`: aligned starts, the last window shortened to the edge)."""
    if tile is None or length <= tile:
        return 1, {length}
    stride = tile - 2 * overlap
    if stride < align:  # the tiler falls back to evenly spaced windows of one size
        return 1 + math.ceil((length - tile) / max(stride, 1)), {tile}
    stride = stride // align * align
    gaps = math.ceil((length - tile) / stride)
    return gaps + 1, {tile, length - gaps * stride}


def plan_tiles(size: tuple[int, int], scale: int, runtime: str, budget: int, source: str, *, images: int = 1,
               align: int = 1, context: int = 0, tile: int | None = None, overlap: int | None = None,
               batch_size: int | None = None, max_tile: int | None = None) -> TilePlan:
    """Choose tile side, overlap and batch for ``images`` pictures of ``size`` (H, W) within ``budget`` bytes.

    Given values win (``tile``, ``overlap``, ``batch_size``); the rest is chosen: the
    whole image when it fits, else the largest tile on the ``align`` grid that does,
    with ``context`` pixels of overlap (less only when the tile is too small to keep an
    ``align``-wide core). ``max_tile`` caps the tile (a runtime's size limit). The batch is
    as many calls as fit, at most :data:`MAX_BATCH`. A runtime that keeps memory per call
    shape (:attr:`RuntimeCost.per_shape`) is charged for every distinct tile shape and
    runs one tile per call.
    Raises :class:`BudgetError` when not even the smallest tile fits.
    """
    cost = RUNTIME_COSTS.get(runtime, FALLBACK_COST)
    height, width = size
    align = max(int(align), 1)
    fixed = image_bytes(height, width, images, scale)
    room = budget - fixed

    def overlap_for(side: int | None) -> int:
        if side is None:
            return overlap if overlap is not None else 0
        return overlap if overlap is not None else max(min(context, (side - align) // 2), 0)

    def held_pixels(side: int | None, batch: int) -> int:
        """Input pixels whose working memory is held at the peak, with ``batch`` tiles per call."""
        rows = _axis_plan(height, side, overlap_for(side), align)[1]
        cols = _axis_plan(width, side, overlap_for(side), align)[1]
        shapes = [_round_up(h, align) * _round_up(w, align) for h in rows for w in cols]
        return batch * (sum(shapes) if cost.per_shape else max(shapes))

    if tile is None:
        whole_fits = max_tile is None or max(height, width) <= max_tile
        if whole_fits and cost.call_bytes(held_pixels(None, 1)) <= room:
            tile = None
        else:
            longest = _round_up(max(height, width), align)
            top = min(longest, (max_tile // align) * align if max_tile else longest)
            sides = range(max(top, align), align - 1, -align)
            tile = next((s for s in sides if cost.call_bytes(held_pixels(s, 1)) <= room), None)
            if tile is None:
                need = fixed + cost.call_bytes(align * align)
                raise BudgetError(
                    f"a memory budget of {format_bytes(budget)} cannot hold this {width}x{height} upscale on "
                    f"{runtime}: even {align}x{align} tiles need ~{format_bytes(need)}; raise --memory-budget "
                    f"(or free memory), or upscale a smaller picture")
    chosen_overlap = overlap_for(tile)
    if batch_size is None and cost.per_shape:
        batch_size = 1  # a short last batch would be one more shape to hold
    if batch_size is None:
        fits = int((room - cost.per_call) // max(cost.per_pixel * held_pixels(tile, 1), 1))
        calls = (images * _axis_plan(height, tile, chosen_overlap, align)[0]
                 * _axis_plan(width, tile, chosen_overlap, align)[0])
        batch_size = max(1, min(MAX_BATCH, fits, calls))
    estimate = fixed + cost.call_bytes(held_pixels(tile, batch_size))
    return TilePlan(tile=tile, overlap=chosen_overlap, batch_size=batch_size, runtime=runtime, budget=budget,
                    estimate=estimate, source=source)


# ----------------------------------------------------------------------------------
# Calibration: how RUNTIME_COSTS were measured
# ----------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, torch
from runtimes import load
spec = json.loads(sys.argv[1])

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key + ":"))

runner = load(spec["artifact"], **spec["options"])
x = torch.rand(spec["batch"], 3, spec["side"], spec["side"])
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM to the current RSS: only the call's growth is measured
before = status("VmRSS")
runner.infer(x)
print(json.dumps({"runtime": runner.name, "growth": status("VmHWM") - before}))
"""


def measure_call_peak(artifact: str, side: int, batch: int = 1, **options: Any) -> tuple[str, int]:
    """(runtime name, peak RSS growth in bytes) of one ``batch`` x ``side`` x ``side`` call, in a fresh process.

    A fresh process so that nothing earlier (other calls' arenas, the parent's tensors)
    hides or inflates the growth. Linux only (``/proc/self/clear_refs``).
    """
    spec = json.dumps({"artifact": artifact, "side": side, "batch": batch, "options": options})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _CHILD, spec], capture_output=True, text=True, cwd=root,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {artifact} at {side}x{side} failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["runtime"], int(result["growth"])


def fit_cost(points: list[tuple[int, int]]) -> RuntimeCost:
    """Least-squares line through (pixels, bytes) points: the coefficients of :class:`RuntimeCost`."""
    n = len(points)
    mx = sum(p for p, _ in points) / n
    my = sum(b for _, b in points) / n
    var = sum((p - mx) ** 2 for p, _ in points)
    slope = sum((p - mx) * (b - my) for p, b in points) / var if var else 0.0
    return RuntimeCost(per_pixel=slope, per_call=max(my - slope * mx, 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.memory",
        description="Measure the peak memory of one model call at several tile sides and fit bytes per input "
                    "pixel (the RUNTIME_COSTS table). Each point runs in a fresh process.",
        epilog="example:\n  python -m runtimes.memory openvino:esc_x4.onnx --sides 64 128 192",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="artifact as runtimes.load takes it (.onnx, openvino:X.onnx, .pth, ...)")
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 128, 192], help="tile sides to measure")
    args = parser.parse_args(argv)
    points, runtime = [], "?"
    for side in args.sides:
        runtime, growth = measure_call_peak(args.artifact, side)
        points.append((side * side, growth))
        print(f"{runtime} {side}x{side}: peak growth {format_bytes(growth)} ({growth / (side * side):.0f} B/px)")
    if len(points) >= 2:
        fitted = fit_cost(points)
        print(f"{runtime}: per_pixel={fitted.per_pixel:.0f} B, per_call={format_bytes(fitted.per_call)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
