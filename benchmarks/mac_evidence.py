"""Everything only a Mac can show about the Core ML packages, from one command.

    python benchmarks/mac_evidence.py --out benchmarks/results/apple-m2          # on the Mac, ~10 minutes
    python benchmarks/mac_evidence.py --dry-run --out /tmp/mac-evidence            # Linux: everything but the device

The Apple counterpart of ``benchmarks/gpu_evidence.py``. Why one command: the placement
of each op (Neural Engine, GPU or CPU) and the latency exist only on Apple hardware, and
this project's machines are Linux; a Mac owner runs this once and commits the folder.

For esc and esc_light, each preset (``m2``, ``iphone``) at the papers' Table 9 size
(M2 128x128, iPhone 32x32: ``--paper-size``), it exports the package with this toolkit,
records the ANE lint (refusals, advice, largest intermediate, transposes) and then, on
macOS, Core ML's compute plan (ops and estimated cost per device: the Neural Engine /
GPU / CPU share), compile time, first-prediction time, the median latency and the PSNR
of Core ML's output against PyTorch fp32 on a real photograph. The presets' default
multifunction packages (tiles 128x128 and 256x256) are profiled per function too.
``results.json`` holds one row per model and Table 9 size, in the shape
``benchmarks/table.py`` merges as a device column (``python -m benchmarks.table``).

``--dry-run`` (any OS) does all of it but the device: exports, lint, every function opened
with ``runtimes.load(package, function=...)`` and one prediction through the numpy
interpreter against PyTorch; its rows are ``skipped`` with the reason and the file says
DRY RUN, so nothing in it passes for a Mac figure. CI runs it with a tiny checkpoint
(``--weights esc=tiny.pth``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("esc", "esc_light")
PRESETS = ("m2", "iphone")
#: Release weights per model (downloaded once; ``--weights`` or ``--random-weights`` instead).
OFFICIAL = {"esc": "official:ESC_DIV2K_X4", "esc_light": "official:ESC_light_X4"}
DRY_RUN_LABEL = "DRY RUN (no Core ML here): structure and interpreter checks only, no Apple figure"


@dataclass(frozen=True)
class Options:
    out: Path
    dry_run: bool
    models: tuple[str, ...]
    presets: tuple[str, ...]
    weights: dict[str, str | None]
    compute_units: str
    warmup: int
    repeat: int
    default_packages: bool
    contingencies: bool


def _is_macos() -> bool:
    return platform.system() == "Darwin"


def device_name(dry_run: bool) -> str:
    """``Apple M2 (MacBook Air)``-style name of this Mac; the DRY RUN label elsewhere."""
    if dry_run:
        return f"DRY RUN ({platform.system() or 'unknown OS'}, no Core ML)"
    import subprocess

    def sysctl(key: str) -> str:
        try:
            return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    chip, model = sysctl("machdep.cpu.brand_string") or platform.machine(), sysctl("hw.model")
    return f"{chip} ({model})" if model else chip


def export_package(model: str, preset: str, weights: str | None, out_dir: Path, paper_size: bool,
                   contingencies: bool) -> Any:
    """The preset's package for ``model`` through the toolkit's exporter (lint and fp16 safety included)."""
    from export import coreml as ce

    suffix = "table9" if paper_size else "tiles"
    # Weights given: the variant and scale are theirs (a small test checkpoint is not "esc");
    # none: random weights of ``model`` at x4.
    cfg = ce.resolve_config(None if weights else model, None if weights else 4, weights, preset=preset,
                            paper_size=paper_size,
                            large_kernel_pieces=contingencies, mean_as_conv=contingencies,
                            output=out_dir / f"{model}_{preset}_{suffix}.mlpackage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn; the row says which weights were used
        return ce.export_coreml(cfg)


def lint_fields(result: Any) -> dict[str, Any]:
    lint = result.lint
    return {"lint": lint.summary(), "lint_ok": lint.ok, "refusals": dict(lint.by_rule()),
            "advice": dict(lint.warnings_by_rule()),
            "largest_intermediate_bytes": {fn: size for fn, (size, _, _) in lint.largest.items()},
            "transposes": dict(lint.transposes), "transposes_per_attention_block": dict(lint.block_transposes)}


def _picture(size: tuple[int, int]) -> Any:
    """A real photograph cropped to ``size`` (scikit-image's sample; a fixed pattern if it is missing)."""
    from export.calibration import CalibrationError, calibration_pictures

    try:
        return calibration_pictures(size=size)[0]
    except CalibrationError:
        import torch

        gen = torch.Generator().manual_seed(0)
        return torch.rand(1, 3, *size, generator=gen)


def psnr_vs_torch(runner: Any, model: Any, size: tuple[int, int]) -> float:
    """PSNR (dB, [0, 1] range) of the runner's output against the fp32 PyTorch model on one photograph."""
    import torch

    from validation.compare import compare

    x = _picture(size)
    with torch.no_grad():
        expected = model(x).float().clamp(0, 1)
    got = runner.infer(x).float().clamp(0, 1)
    return float(compare(expected, got, atol=1.0, name="mac evidence").psnr)


def measure_function(result: Any, function: str, opts: Options) -> dict[str, Any]:
    """One function of a package: opened by runtimes.load; on macOS profiled, else one interpreter prediction."""
    from runtimes import load
    from runtimes.cli_args import format_size

    size = result.report.functions[function]
    fields: dict[str, Any] = {"function": function, "input_size": format_size(*size)}
    if opts.dry_run:
        with load(str(result.path), function=function, backend="interpreter") as runner:
            fields["opened"] = runner.describe()["runtime"]
            fields["interpreter_psnr_vs_torch_db"] = psnr_vs_torch(runner, result.model, size)
        return fields
    from runtimes.coreml_runner import profile_on_mac

    profile = profile_on_mac(result.path, compute_units=opts.compute_units, warmup=opts.warmup, repeat=opts.repeat,
                             function=function)
    plan = profile["plan"]
    total_cost = sum(plan["cost_per_device"].values()) or 1.0
    fields.update({
        "compile_ms": profile["load_ms"], "first_predict_ms": profile["first_predict_ms"],
        "latency_median_ms": profile["median_ms"], "latency_p10_ms": profile["p10_ms"],
        "latency_p90_ms": profile["p90_ms"], "ops_per_device": plan["ops_per_device"],
        "cost_share": {device: cost / total_cost for device, cost in plan["cost_per_device"].items()},
        "ops_off_neural_engine": plan["ops_off_neural_engine"][:50],
    })
    with load(str(result.path), function=function, compute_units=opts.compute_units) as runner:
        fields["coreml_psnr_vs_torch_db"] = psnr_vs_torch(runner, result.model, size)
    return fields


def _guarded(base: dict[str, Any], work) -> dict[str, Any]:
    """``base`` plus what ``work`` measured; a row that raised is ``failed`` with its reason (exit status 1)."""
    try:
        base.update(work())
    except Exception as exc:  # reported in the row and the exit status, never hidden
        base.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400],
                    traceback=traceback.format_exc(limit=4))
    return base


def table_row(model: str, preset: str, opts: Options) -> dict[str, Any]:
    """The results.json row of one model at one preset's Table 9 size."""
    row: dict[str, Any] = {"model": model, "runtime": "coreml", "precision": "fp16", "preset": preset,
                           "weights": opts.weights.get(model) or "random", "status": "ok"}

    def work() -> dict[str, Any]:
        result = export_package(model, preset, opts.weights.get(model), opts.out / "packages", True,
                                opts.contingencies)
        (function,) = result.report.functions
        fields = {"package": str(result.path), **lint_fields(result),
                  "fp16_safety": result.fp16_safety.summary() if result.fp16_safety else None,
                  **measure_function(result, function, opts)}
        if opts.dry_run:
            fields.update(status="skipped", reason=DRY_RUN_LABEL)
        return fields

    from export import coreml as ce
    from runtimes.cli_args import format_size

    row["input_size"] = format_size(*ce.PRESETS[preset].paper_size)
    return _guarded(row, work)


def default_package(model: str, preset: str, opts: Options) -> dict[str, Any]:
    """The preset's default multifunction package (app tiles): lint and every function measured."""
    entry: dict[str, Any] = {"model": model, "preset": preset, "status": "ok"}

    def work() -> dict[str, Any]:
        result = export_package(model, preset, opts.weights.get(model), opts.out / "packages", False,
                                opts.contingencies)
        return {"package": str(result.path), **lint_fields(result),
                "functions": [measure_function(result, fn, opts) for fn in result.report.functions]}

    return _guarded(entry, work)


def machine_block(opts: Options) -> dict[str, Any]:
    from benchmarks.measure import machine_info

    weights = sorted({w or "random" for w in opts.weights.values()})
    info = machine_info("cpu", weights=", ".join(weights))
    info["device_name"] = device_name(opts.dry_run)
    info["mode"] = "dry-run" if opts.dry_run else "mac"
    info["macos"] = platform.mac_ver()[0] or None
    return info


def run(opts: Options) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    jobs = [(m, p) for m in opts.models for p in opts.presets]
    rows = [table_row(m, p, opts) for m, p in tqdm(jobs, desc="Table 9 packages", file=sys.stderr)]
    packages = ([default_package(m, p, opts) for m, p in tqdm(jobs, desc="default packages", file=sys.stderr)]
                if opts.default_packages else [])
    return {"machine": machine_block(opts), "mode": "dry-run" if opts.dry_run else "mac",
            "note": DRY_RUN_LABEL if opts.dry_run else "", "config": {
                "compute_units": opts.compute_units, "warmup": opts.warmup, "repeat": opts.repeat,
                "contingencies": opts.contingencies, "scale": 4},
            "rows": rows, "packages": packages}


def markdown(results: dict[str, Any]) -> str:
    """README.md of the evidence folder: one line per row and package function."""
    title = "# Core ML evidence" + (f" -- {DRY_RUN_LABEL}" if results["mode"] == "dry-run" else "")
    lines = [title, "", f"- device: {results['machine']['device_name']}, macOS {results['machine'].get('macos')}",
             f"- date {results['machine'].get('date')}; weights {results['machine'].get('weights')}", "",
             "| model | preset | input | status | compile ms | first ms | median ms | ANE cost share | PSNR vs torch | lint |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]

    def number(value: Any, spec: str = ".1f") -> str:
        return "" if value is None else format(value, spec)

    for r in results["rows"]:
        share = (r.get("cost_share") or {}).get("neural_engine")
        psnr = r.get("coreml_psnr_vs_torch_db", r.get("interpreter_psnr_vs_torch_db"))
        lines.append(f"| {r['model']} | {r['preset']} | {r.get('input_size')} | {r['status']} | "
                     f"{number(r.get('compile_ms'))} | {number(r.get('first_predict_ms'))} | "
                     f"{number(r.get('latency_median_ms'))} | {number(share, '.0%')} | {number(psnr)} | "
                     f"{r.get('lint', r.get('reason', ''))} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mac_evidence", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, README.md and the packages")
    parser.add_argument("--dry-run", action="store_true",
                        help="no Core ML: export, lint and open every function through the numpy interpreter")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated (default {','.join(PRESETS)})")
    parser.add_argument("--weights", default=None, metavar="MODEL=PATH,...",
                        help="weights per model (default: the official release, downloaded once)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights (latency does not depend on them; PSNR then means little)")
    parser.add_argument("--compute-units", default="all", help="Core ML compute units (default all)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed predictions first (default 3)")
    parser.add_argument("--repeat", type=int, default=20, help="timed predictions per package (>= 10; default 20)")
    parser.add_argument("--no-default-packages", action="store_true",
                        help="only the Table 9 packages, not the presets' multifunction app packages")
    parser.add_argument("--contingencies", action="store_true",
                        help="export with --large-kernel-pieces and --mean-as-conv (compare with a run without)")
    return parser


def parse_args(argv: list[str] | None) -> Options:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    unknown = [m for m in models if m not in MODELS] + [p for p in presets if p not in PRESETS]
    if unknown or not models or not presets:
        parser.error(f"--models takes {', '.join(MODELS)} and --presets {', '.join(PRESETS)}; got {', '.join(unknown) or 'none'}")
    weights: dict[str, str | None] = {m: None if args.random_weights else OFFICIAL[m] for m in models}
    for item in (args.weights or "").split(","):
        if not item.strip():
            continue
        name, sep, path = item.partition("=")
        if not sep or name.strip() not in models:
            parser.error(f"--weights takes MODEL=PATH for the models run ({', '.join(models)}), got {item!r}")
        weights[name.strip()] = path.strip()
    if args.repeat < 10 and not args.dry_run:
        parser.error(f"--repeat must be >= 10 on a Mac (a median of fewer predictions is noise), got {args.repeat}")
    return Options(args.out, args.dry_run, models, presets, weights, args.compute_units, args.warmup, args.repeat,
                   not args.no_default_packages, args.contingencies)


def main(argv: list[str] | None = None) -> int:
    """Run it all; exit 1 when a row failed, 2 when Core ML is missing and --dry-run was not given."""
    opts = parse_args(argv)
    if not opts.dry_run and not _is_macos():
        print(f"error: Core ML runs only on macOS (this is {platform.system() or 'an unknown OS'}); on Linux run "
              f"with --dry-run, which exports, lints and checks every package through the numpy interpreter",
              file=sys.stderr)
        return 2
    from runtimes.metadata import write_text_atomic

    start = time.monotonic()
    results = run(opts)
    results["seconds"] = round(time.monotonic() - start, 1)
    write_text_atomic(opts.out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    write_text_atomic(opts.out / "README.md", markdown(results))
    failed = [r for r in results["rows"] + results["packages"] if r["status"] == "failed"]
    for r in failed:
        print(f"failed: {r['model']} {r['preset']}: {r['reason']}", file=sys.stderr)
    print(f"[mac_evidence] {len(results['rows'])} rows, {len(results['packages'])} packages, {len(failed)} failed; "
          f"wrote {opts.out / 'results.json'} (merge: python -m benchmarks.table {opts.out / 'results.json'})",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
