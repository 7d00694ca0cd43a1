"""Peak memory of a default ``upscale`` on one large picture, every runtime in one run.

    python benchmarks/upscale_memory.py --weights ../shared/golden/esc_light_x4_35x35_b1.pth \\
        --image ../shared/data/real_inputs/OST_009.png --size 1024x1024

Why: the upscale CLI promises to choose tile and batch from a memory budget so that no
runtime runs out of memory; this is the check a user would make. The picture is resized
(bicubic) to ``--size`` and written once; the checkpoint is exported to ONNX once; then
``python -m runtimes.upscale`` runs with default settings (no ``--tile``/``--batch-size``)
for each runtime in its own child process, one after another, and the child's peak
resident memory (``ru_maxrss`` from ``os.wait4``: the whole process, model and pictures
included) is recorded beside its wall time and the tiling line it printed. The 8-bit
outputs are compared with the first runtime's (largest difference in levels, share of
identical values). Writes ``results.json`` and ``results.md`` to ``--output``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.measure import package_version  # noqa: E402
from runtimes.cli_args import SIZE_SYNTAX, parse_size  # noqa: E402
from runtimes.metadata import write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnxruntime", "openvino")


def artifact_for(runtime: str, weights: Path, onnx_path: Path) -> str:
    """The ``--artifact`` value that makes ``runtimes.load`` pick ``runtime``."""
    return {"torch": str(weights), "onnxruntime": str(onnx_path), "openvino": f"openvino:{onnx_path}"}[runtime]


def run_child(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit status, wall seconds, peak RSS bytes, combined output) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return child.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024, log.read()


def agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Largest 8-bit difference and the share of identical values between two pictures."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max_levels": int(diff.max()), "identical": float((diff == 0).mean())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/upscale_memory.py", description=__doc__.split("\n\n")[2],
        epilog="example:\n  python benchmarks/upscale_memory.py --weights ../shared/golden/esc_light_x4_35x35_b1.pth "
               "--image ../shared/data/real_inputs/OST_009.png --size 1024x1024",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="ESC checkpoint (.pth/.safetensors)")
    parser.add_argument("--image", type=Path, required=True, help="picture to upscale (resized to --size)")
    parser.add_argument("--size", type=parse_size, default=(1024, 1024), help=f"input size, {SIZE_SYNTAX}")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated, from " + ", ".join(RUNTIMES))
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/upscale_memory")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown runtime(s) {', '.join(unknown)}; choose from {', '.join(RUNTIMES)}")
    for path in (args.weights, args.image):
        if not path.is_file():
            parser.error(f"{path} does not exist")

    height, width = args.size
    with tempfile.TemporaryDirectory(prefix="upscale_memory_") as tmp:
        work = Path(tmp)
        picture = work / f"input_{width}x{height}.png"
        Image.open(args.image).convert("RGB").resize((width, height), Image.BICUBIC).save(picture)
        onnx_path = work / "model.onnx"
        if {"onnxruntime", "openvino"} & set(runtimes):
            code, _, _, log = run_child([sys.executable, "export/to_onnx.py", "--weights", str(args.weights),
                                         "-o", str(onnx_path)])
            if code != 0:
                print(log[-3000:], file=sys.stderr)
                return 1
        rows, reference = [], None
        for runtime in runtimes:
            out = work / f"out_{runtime}.png"
            cmd = [sys.executable, "-m", "runtimes.upscale", str(picture), str(out), "--quiet",
                   "--artifact", artifact_for(runtime, args.weights, onnx_path)]
            print(f"{runtime}: upscaling {width}x{height} ...", flush=True)
            code, wall, peak, log = run_child(cmd)
            plan = next((line.strip() for line in log.splitlines() if line.strip().startswith("tiling:")), None)
            row = {"runtime": runtime, "exit": code, "wall_s": round(wall, 1), "peak_rss_bytes": peak,
                   "plan": plan}
            if code != 0:
                row["error"] = log.strip()[-1000:]
            else:
                pixels = np.asarray(Image.open(out))
                if reference is None:
                    reference = (runtime, pixels)
                else:
                    row["vs_" + reference[0]] = agreement(pixels, reference[1])
            print(json.dumps(row), flush=True)
            rows.append(row)

    result = {"image": str(args.image), "size": f"{width}x{height}", "weights": str(args.weights),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_before": os.getloadavg()},
              "versions": {p: package_version(p) for p in ("torch", "onnxruntime", "openvino")},
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(args.output / "results.md", markdown(result))
    print(markdown(result))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def markdown(result: dict) -> str:
    """The side-by-side table of one run."""
    lines = [f"Default `upscale` of a {result['size']} picture ({Path(result['image']).name}, bicubic-resized), "
             f"{Path(result['weights']).name}, {result['date']}", "",
             "| runtime | peak RSS | wall | plan chosen | 8-bit vs first row |", "|---|---:|---:|---|---|"]
    for row in result["rows"]:
        vs = next((v for k, v in row.items() if k.startswith("vs_")), None)
        agree = f"max {vs['max_levels']} levels, {vs['identical']:.2%} identical" if vs else "-"
        status = "" if row["exit"] == 0 else f" (failed: exit {row['exit']})"
        lines.append(f"| {row['runtime']}{status} | {row['peak_rss_bytes'] / 2**30:.2f} GiB | {row['wall_s']:.0f} s "
                     f"| {row['plan'] or '-'} | {agree} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
