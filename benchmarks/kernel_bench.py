"""Benchmark the fused Triton window-attention kernel against the eager back-ends.

Shape: ESC x4 on an HD output, i.e. attention at the LR feature resolution
180x320 (reflect-padded to 192x320 by every method), C = 64, 4 heads,
window 32, fp16, batch 1: 60 windows of 1024 tokens.

Rows (all on the same random ``qkv`` map and bias table):

* ``fused``: the Triton kernel, ``qkv`` map -> output map in one launch
  (through the ``esc::window_attention`` op, plus the raw launcher at every
  ``--fused-blocks`` tile shape);
* ``sdpa`` / ``flex`` / ``naive``: the model's back-ends
  (:mod:`models.attention.backends`): SDPA with the precomputed dense
  ``(1, heads, 1024, 1024)`` bias as the mask, FlexAttention (compiled) with a
  ``score_mod`` that gathers from the table, explicit matmul-softmax-matmul.
  Each is timed end to end (map -> map: pad, partition, attention, merge,
  crop; what the fused kernel replaces) and core only (pre-partitioned
  windows, which flatters them).

Timing uses CUDA events around each call after a warmup (which also absorbs
compilation), median and min over ``--repeat`` calls; memory is the peak
allocated by one call on top of what was allocated before it (output
included). Every row is also checked against the fp32 reference.

Run from the repository root on a CUDA machine::

    python -m benchmarks.kernel_bench            # or: python benchmarks/kernel_bench.py

Writes ``benchmarks/results/kernel_bench_<device>.md`` and ``.json``. Importing
this module does nothing; on a machine without CUDA ``main`` exits with a message.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Row:
    """One benchmarked method."""

    method: str
    scope: str
    median_ms: float
    min_ms: float
    peak_extra_mib: float
    max_abs_err: float


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (on a CUDA machine):\n  python -m benchmarks.kernel_bench --dtype bf16 --repeat 30 --no-flex")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=180, help="LR feature height (padded to a window multiple)")
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument(
        "--fused-blocks",
        default="64x64,128x64,64x128,128x128",
        help="comma-separated BLOCK_MxBLOCK_N tile shapes for the raw Triton launcher",
    )
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiling it takes a while)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def time_cuda(fn: Callable[[], torch.Tensor], warmup: int, repeat: int) -> tuple[float, float]:
    """Median and min milliseconds of ``fn`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in events]
    return statistics.median(times), min(times)


def peak_extra_mib(fn: Callable[[], torch.Tensor]) -> float:
    """Peak memory allocated by one call of ``fn`` above the current allocation (MiB)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def _device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _markdown(meta: dict, rows: list[Row]) -> str:
    baseline = next((r.median_ms for r in rows if r.method == "sdpa" and r.scope == "end-to-end"), None)
    lines = [
        "# Fused window attention benchmark",
        "",
        f"- device: {meta['device']} (sm_{meta['capability']}), CUDA {meta['cuda']}",
        f"- torch {meta['torch']}, triton {meta['triton']}",
        f"- qkv {tuple(meta['qkv_shape'])} {meta['dtype']}, window {meta['window']}, heads {meta['heads']}, "
        f"padded to {meta['padded_hw'][0]}x{meta['padded_hw'][1]} ({meta['windows']} windows)",
        f"- CUDA events, {meta['warmup']} warmup + {meta['repeat']} timed calls; peak = extra memory of one call",
        "",
        "| method | scope | median ms | min ms | vs sdpa end-to-end | peak extra MiB | max abs err vs fp32 ref |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = f"{baseline / r.median_ms:.2f}x" if baseline else "n/a"
        lines.append(
            f"| {r.method} | {r.scope} | {r.median_ms:.3f} | {r.min_ms:.3f} | {speedup} | "
            f"{r.peak_extra_mib:.1f} | {r.max_abs_err:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "kernel_bench.py needs a CUDA GPU (torch.cuda.is_available() is False): it times the compiled "
            "Triton kernel with CUDA events. On CPU, use tests/test_fused_kernel.py (Triton interpreter) "
            "for correctness instead."
        )

    import triton

    from models.attention.backends import FlexBackend, FusedBackend, NaiveBackend, SdpaBackend
    from models.attention.module import WindowAttention
    from models.attention.windows import merge, pad_to_windows, partition
    from models.kernels.reference import window_attention_reference
    from models.kernels.window_attention_triton import window_attention_triton

    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    heads, window, batch = args.heads, args.window, args.batch
    height, width = args.height, args.width
    gen = torch.Generator(device=device).manual_seed(0)

    attn = WindowAttention(dim=heads * 16, window=window, heads=heads).to(device, dtype).eval()
    with torch.no_grad():
        attn.relative_position_bias.normal_(0.0, 1.0, generator=gen)
    attn.precompute_bias()  # "given the dense bias": SDPA and naive do not rebuild it per call
    table = attn.relative_position_bias.detach()
    qkv = torch.randn(batch, 3 * heads * 16, height, width, device=device, dtype=dtype, generator=gen)

    reference = window_attention_reference(qkv, table.float(), window, heads).float()
    padded = pad_to_windows(qkv, window)
    hp, wp = padded.shape[-2:]
    q, k, v = partition(padded, window, heads)

    def windows_to_map(out: torch.Tensor) -> torch.Tensor:
        return merge(out, batch, hp, wp, window)[:, :, :height, :width]

    methods: list[tuple[str, str, Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = []
    methods.append(("fused (esc::window_attention op)", "end-to-end", lambda: FusedBackend()(qkv, attn), lambda o: o))
    for spec in filter(None, args.fused_blocks.split(",")):
        block_m, block_n = (int(n) for n in spec.lower().split("x"))
        methods.append((
            f"fused (triton {block_m}x{block_n})",
            "end-to-end",
            lambda bm=block_m, bn=block_n: window_attention_triton(qkv, table, window, heads, block_m=bm, block_n=bn),
            lambda o: o,
        ))
    backends: list[tuple[str, object]] = [("sdpa", SdpaBackend()), ("naive", NaiveBackend())]
    if not args.no_flex:
        backends.insert(1, ("flex", FlexBackend(compile=True)))
    for name, backend in backends:
        methods.append((name, "end-to-end", lambda b=backend: b(qkv, attn), lambda o: o))
        methods.append((name, "core", lambda b=backend: b.core(q, k, v, attn), windows_to_map))

    rows: list[Row] = []
    with torch.inference_mode():
        for name, scope, fn, to_map in methods:
            err = (to_map(fn()).float() - reference).abs().max().item()
            median_ms, min_ms = time_cuda(fn, args.warmup, args.repeat)
            rows.append(Row(name, scope, median_ms, min_ms, peak_extra_mib(fn), err))
            print(f"{name:34s} {scope:10s} {median_ms:8.3f} ms  err {err:.2e}", flush=True)

    props = torch.cuda.get_device_properties(device)
    meta = {
        "device": props.name,
        "capability": f"{props.major}{props.minor}",
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "qkv_shape": list(qkv.shape),
        "padded_hw": [hp, wp],
        "windows": batch * (hp // window) * (wp // window),
        "dtype": args.dtype,
        "window": window,
        "heads": heads,
        "warmup": args.warmup,
        "repeat": args.repeat,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"kernel_bench_{_device_slug(props.name)}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": [asdict(r) for r in rows]}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(_markdown(meta, rows))
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
