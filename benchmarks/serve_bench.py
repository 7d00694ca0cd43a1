"""Throughput of ``runtimes.serve`` at several client concurrencies, with and without dynamic batching.

    python benchmarks/serve_bench.py --artifact artifacts/esc_light_x4.onnx --size 64x64 --requests 16

For each mode (dynamic batching: ``--max-batch``/``--max-delay-us``; no batching:
``--max-batch 1``) one server is started on free 127.0.0.1 ports (a child process group,
always stopped), warmed up, and then, for each concurrency C, ``--requests`` equal-size
images are sent by C threads over HTTP as fast as answers come back.  Reported per row:
images/s (requests / wall time), median and 90th-percentile latency, and the mean batch
the server formed (``nv_inference_count`` / ``nv_inference_exec_count`` deltas).  All rows
come from one run, so they share the machine's conditions; the load average is recorded.
Writes ``results.json`` and ``results.md`` to ``--output`` (default
``benchmarks/results/serve``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from runtimes.cli_args import SIZE_SYNTAX, parse_size, positive_int  # noqa: E402
from runtimes.serve import ServeOptions, ServerProcess, free_ports  # noqa: E402
from runtimes.serve_client import TritonRunner, read_metric  # noqa: E402


@dataclass
class Row:
    mode: str
    concurrency: int
    images: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    mean_batch: float


def _concurrencies(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--artifact", required=True, help="what the server runs (model.onnx, openvino:model.onnx, ...)")
    p.add_argument("--size", type=parse_size, default=(64, 64), help=f"input size, {SIZE_SYNTAX} (default 64x64)")
    p.add_argument("--requests", type=positive_int, default=16, help="images per concurrency level (default 16)")
    p.add_argument("--concurrency", type=_concurrencies, default=[1, 2, 4, 8], help="levels (default 1,2,4,8)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="batching mode's max batch (default 8)")
    p.add_argument("--max-delay-us", type=positive_int, default=5000,
                   help="batching mode's queue delay (default 5000)")
    p.add_argument("--threads", type=positive_int, default=None, help="runtime CPU threads in the server")
    p.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "serve")
    return p


def measure(client: TritonRunner, image: torch.Tensor, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Wall seconds for ``requests`` calls from ``concurrency`` threads, and each call's latency."""
    def one(_: int) -> float:
        start = time.perf_counter()
        client.infer(image)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return time.perf_counter() - start, latencies


def run_mode(mode: str, args: argparse.Namespace, max_batch: int, delay_us: int, log_dir: Path) -> list[Row]:
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, max_batch=max_batch,
                           max_delay_us=delay_us)
    extra = ["--threads", str(args.threads)] if args.threads else []
    server = ServerProcess.start(args.artifact, options, log_dir / f"{mode.replace(' ', '_')}.log", extra)
    rows = []
    try:
        server.wait_ready()
        metrics_url = f"http://127.0.0.1:{metrics}/metrics"
        image = torch.from_numpy(np.random.default_rng(0).random((1, 3, *args.size), dtype=np.float32))
        with TritonRunner(f"http://127.0.0.1:{http}") as client:
            measure(client, image, max(args.concurrency), max(args.concurrency))  # warm-up: every connection
            for concurrency in args.concurrency:
                before = [read_metric(metrics_url, n) for n in ("nv_inference_count", "nv_inference_exec_count")]
                seconds, latencies = measure(client, image, args.requests, concurrency)
                after = [read_metric(metrics_url, n) for n in ("nv_inference_count", "nv_inference_exec_count")]
                batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                ms = np.array(latencies) * 1000
                rows.append(Row(mode, concurrency, args.requests, round(seconds, 2), round(args.requests / seconds, 2),
                                round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 90)), 1),
                                round(batch, 2)))
                print(f"{mode:18s} c={concurrency}: {rows[-1].images_per_s:.2f} images/s, "
                      f"mean batch {rows[-1].mean_batch}", flush=True)
    finally:
        server.stop()
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.machine()


def markdown(rows: list[Row], context: dict[str, str]) -> str:
    lines = [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", "| mode | concurrency | images/s | p50 ms | p90 ms | mean batch |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.mode} | {r.concurrency} | {r.images_per_s:.2f} | {r.p50_ms:,.1f} | {r.p90_ms:,.1f} | "
              f"{r.mean_batch:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serve_bench.") as logs:
        rows = run_mode("dynamic batching", args, args.max_batch, args.max_delay_us, Path(logs))
        rows += run_mode("no batching", args, 1, 0, Path(logs))
    h, w = args.size
    context = {
        "artifact": f"{args.artifact} (input {w}x{h}, {args.requests} images per row, HTTP, one model instance)",
        "batching": f"--max-batch {args.max_batch} --max-delay-us {args.max_delay_us} vs --max-batch 1",
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs, load average "
                   f"{load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after",
        "versions": ", ".join(f"{p} {version(p)}" for p in ("nvidia-pytriton", "tritonclient", "onnxruntime")),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps({"context": context, "rows": [asdict(r) for r in rows]},
                                                         indent=2) + "\n")
    table = markdown(rows, context)
    (args.output / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
