"""Benchmark ESC models (and light SR peers) across runtimes: one table, like the papers'.

    python benchmarks/run.py --models esc,esc_light,esc_fp --peers swinir_light,omnisr,span \\
        --runtimes torch,torch_compile,onnxruntime,openvino --scale 4 --output-size 1280x720

    # CPU, with peers from a second environment (torch + torchvision that match, spandrel):
    python benchmarks/run.py --peers swinir_light,omnisr,span --peer-python /work/peer-venv/bin/python \\
        --precision fp32,bf16,int8 --output-size 512x512

Every (model, runtime, precision) row is measured in its own child process, so one
row's allocations, compiled kernels or thread pools never leak into the next.  A row
records params, FLOPs (torch.utils.flop_counter at that input, counted once per model
and size; a multiply-add counts 2 FLOPs, so halve it to compare with MAC-based "FLOPs"
columns), latency median / p10 / p90, peak memory, versions and a status:

* ``ok``;
* ``failed``: the reason (an export that does not go through, a missing runtime...);
* ``OOM``: CUDA ran out of memory;
* ``skipped``: the runtime cannot run on this machine (TensorRT without CUDA, Core ML
  off macOS), with why.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed calls (weights
included; runtimes outside PyTorch's allocator are not measured); on the CPU the child's
peak RSS growth during the calls over its RSS after setup (VmHWM reset through
/proc/self/clear_refs).

Roofline: before the rows the parent times a 2048x2048 fp32 matmul (and bf16); each row
reports achieved GFLOP/s (model FLOPs / latency), ``x floor`` (latency over the compute
floor, model FLOPs at that fp32 matmul rate: 1.0 would be a model running as fast as a big
matmul) and bytes of peak memory per input pixel.

Precisions: fp32; fp16 and bf16 (OpenVINO lowers the fp32 graph with
INFERENCE_PRECISION_HINT; ONNX Runtime runs an fp16 graph); int8 (ONNX Runtime's static
post-training quantisation, QDQ, calibrated on the real pictures of ``--data``, run by
ONNX Runtime and OpenVINO). Every non-fp32 row also states its PSNR and max error against
the fp32 file on a Set5 picture, judged by ``validation.compare.THRESHOLDS``.

Peers come from spandrel, which needs a torchvision built for the same torch. Where this
interpreter has none (the CPU torch wheel), ``--peer-python`` names another interpreter
(a venv with a matching pair): peer rows that build the PyTorch model run there; their
ONNX Runtime / OpenVINO rows run the exported file here.

Sizes are WIDTHxHEIGHT (1280x720 is 720p); the input is output / scale.  Models are
random-weight (latency does not depend on the weights).  ONNX files are exported once
at the fixed input shape to ``--cache-dir`` and shared by the ONNX Runtime and OpenVINO
rows; TensorRT rows build their engine there with the builder of ``export/to_trt.py``
(CUDA and TensorRT needed), Core ML rows their .mlpackage with the path of
``export/to_coreml.py`` (prediction needs macOS); elsewhere those rows say why they skipped.

Outputs in ``--out`` (default ``benchmarks/results/<device-name>/``): results.json (rows
and machine info), results.csv, results.md, latency.png and latency_vs_params.png.  The
JSON is rewritten atomically after every row; a rerun keeps the rows it already has for
the same model / runtime / precision / device / scale / size and measures only the
others (``--fresh`` starts over, ``--retry-failed`` re-measures failed rows).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.measure import (  # noqa: E402
    ONNX_RUNTIMES, device_name, machine_info, matmul_rate_gflops, onnx_path_for, parse_model_name, probe_spandrel,
    run_child, runtime_unavailable)
from benchmarks.quality import DEFAULT_DATA  # noqa: E402
from benchmarks.report import add_roofline, markdown_table, write_outputs  # noqa: E402
from models.config import VARIANTS, ESCConfig  # noqa: E402
from runtimes.cli_args import SIZE_SYNTAX, parse_size  # noqa: E402

#: Every registered variant: the ESC family and its successors (ESC-RIB, SST).
ESC_MODELS = tuple(VARIANTS)

PEERS = ("swinir_light", "omnisr", "span")

RUNTIMES = ("torch", "torch_compile", "onnxruntime", "openvino", "tensorrt", "coreml")

PRECISIONS = ("fp32", "fp16", "bf16", "int8")

KEY_FIELDS = ("model", "runtime", "precision", "device", "scale", "input_size", "output_size")


SPANDREL_HINT = ("install torchvision matching torch (GPU machines ship it) and `pip install -e .[peers]`, "
                 "or pass --peer-python with an environment that has both")



def row_key(row: dict[str, Any]) -> tuple:
    return tuple(str(row.get(k)) for k in KEY_FIELDS)


def _names(text: str, valid: tuple[str, ...], what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in valid and not _flashbias_form_of(n, valid)]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; choose from: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def _flashbias_form_of(name: str, valid: tuple[str, ...]) -> bool:
    """Whether ``name`` is ``VARIANT+fbR`` for an ESC-family variant among ``valid`` (RIB models have no table)."""
    variant, rank = parse_model_name(name)
    return bool(rank) and variant in valid and isinstance(VARIANTS[variant].config, ESCConfig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="esc,esc_light,esc_fp",
                   help=f"comma-separated model variants ({', '.join(ESC_MODELS)}) or 'none'; VARIANT+fbR is the "
                        f"ESC variant in upstream's FlashBias form at rank R (esc+fb48: rank-48 factors instead of "
                        f"bias tables, mask-free attention). Default: %(default)s")
    p.add_argument("--peers", default="none",
                   help=f"comma-separated peer models built from spandrel ({', '.join(PEERS)}) or 'none' "
                        f"(default); needs spandrel (pip install -e .[peers]) and a matching torchvision")
    p.add_argument("--runtimes", default="torch,torch_compile,onnxruntime,openvino",
                   help=f"comma-separated runtimes ({', '.join(RUNTIMES)}). Default: %(default)s")
    p.add_argument("--scale", type=int, default=4, choices=(2, 3, 4), help="upscaling factor (default 4)")
    p.add_argument("--output-size", type=parse_size, default=(720, 1280), metavar="WIDTHxHEIGHT",
                   help=f"output size ({SIZE_SYNTAX}); the input is this / scale (default 1280x720)")
    p.add_argument("--precision", default="fp32",
                   help=f"comma-separated precisions ({', '.join(PRECISIONS)}). Default: fp32")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--peer-python", type=Path, default=None, metavar="PYTHON",
                   help="interpreter for the peers' PyTorch work (export, torch rows), e.g. "
                        "/work/peer-venv/bin/python: an environment with spandrel and a torchvision that "
                        "matches its torch (default: this interpreter)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="pictures: real_inputs/ calibrates int8, Set5/LR_bicubic/X4/ measures the "
                        "PSNR of non-fp32 rows against fp32 (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (default 3)")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per row (default 10)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results/<device-name>/)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "benchmarks" / ".cache",
                   help="where exported ONNX files are kept between rows and runs (default benchmarks/.cache)")
    p.add_argument("--fresh", action="store_true", help="discard rows already in results.json and re-measure")
    p.add_argument("--retry-failed", action="store_true", help="re-measure rows that failed (kept otherwise)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one row may take (default 1800)")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = _names(args.models, ESC_MODELS, "model(s)", parser)
    peers = _names(args.peers, PEERS, "peer(s)", parser)
    runtimes = _names(args.runtimes, RUNTIMES, "runtime(s)", parser)
    precisions = _names(args.precision, PRECISIONS, "precision(s)", parser)
    if not models and not peers:
        parser.error("nothing to measure: --models and --peers are both empty")
    if not runtimes:
        parser.error("--runtimes is empty")
    if not precisions:
        parser.error("--precision is empty")
    if args.warmup < 0 or args.repeat < 1:
        parser.error("--warmup must be >= 0 and --repeat >= 1")
    if args.peer_python is not None and not (args.peer_python.is_file() and os.access(args.peer_python, os.X_OK)):
        parser.error(f"--peer-python {args.peer_python} is not an executable file; give the python of an "
                     f"environment with spandrel and matching torch/torchvision (e.g. /work/peer-venv/bin/python)")
    peer_python = str(args.peer_python.absolute()) if args.peer_python is not None else None
    device = args.device.strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        parser.error(f"--device must be cpu or cuda[:N], not {args.device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: this PyTorch build sees no CUDA device (torch {torch.__version__})")
    oh, ow = args.output_size
    if ow % args.scale or oh % args.scale:
        parser.error(f"--output-size {ow}x{oh} is not divisible by --scale {args.scale}")
    iw, ih = ow // args.scale, oh // args.scale

    out: Path = args.out or ROOT / "benchmarks" / "results" / device_name(device)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info(device)
    if device == "cpu":  # the compute floor of every row, measured in this run
        info["matmul_gflops"] = {"fp32": round(matmul_rate_gflops(), 1)}
    config = {"scale": args.scale, "output_size": f"{ow}x{oh}", "input_size": f"{iw}x{ih}",
              "warmup": args.warmup, "repeat": args.repeat, "device": device}

    existing: list[dict[str, Any]] = []
    flops_cache: dict[str, float] = {}
    params_cache: dict[str, int] = {}
    results_json = out / "results.json"
    if results_json.is_file() and not args.fresh:
        try:
            old = json.loads(results_json.read_text())
            existing = list(old.get("rows", []))
            flops_cache = dict(old.get("flops", {}))
            params_cache = dict(old.get("params", {}))
            kept_rate = old.get("machine", {}).get("matmul_gflops")
            if existing and kept_rate and "matmul_gflops" in info:
                # One compute floor per file: the kept rows' ratios were taken against the
                # earlier measurement, so new rows use it too; today's is recorded beside it.
                info["matmul_gflops_this_resume"] = info["matmul_gflops"]
                info["matmul_gflops"] = kept_rate
        except (OSError, ValueError) as exc:
            print(f"warning: ignoring unreadable {results_json} ({exc})", file=sys.stderr)
    rows_by_key = {row_key(r): r for r in existing}

    grid = [(m, "esc") for m in models] + [(m, "peer") for m in peers]
    todo = []
    for model, family in grid:
        for runtime in runtimes:
            for precision in precisions:
                todo.append({"model": model, "family": family, "runtime": runtime, "precision": precision,
                             "device": device, "scale": args.scale, "input_size": f"{iw}x{ih}",
                             "output_size": f"{ow}x{oh}"})

    spandrel_error: str | None = None
    if peers:
        spandrel_error = probe_spandrel(peer_python)

    data = {"machine": info, "config": config, "rows": existing, "flops": flops_cache,
            "params": params_cache}

    def save(plots: bool = False) -> None:
        # Rows of this grid in grid order first, then older rows of other configs.
        keys = [row_key(t) for t in todo]
        ordered = [rows_by_key[k] for k in keys if k in rows_by_key]
        others = [r for k, r in rows_by_key.items() if k not in set(keys)]
        data["rows"] = ordered + others
        write_outputs(data, out, plots=plots)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(total=len(todo), unit="row", dynamic_ncols=True) if tqdm else None
    measured = kept = 0
    try:
        for base in todo:
            key = row_key(base)
            label = f"{base['model']}/{base['runtime']}/{base['precision']}"
            if bar:
                bar.set_description(label)
            old = rows_by_key.get(key)
            if old is not None and not (args.retry_failed and old.get("status") in ("failed", "OOM")):
                kept += 1
                if bar:
                    bar.update(1)
                continue
            row = dict(base, warmup=args.warmup, repeat=args.repeat, weights=info["weights"],
                       torch_version=info["versions"]["torch"],
                       onnxruntime_version=info["versions"]["onnxruntime"],
                       openvino_version=info["versions"]["openvino"],
                       timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            flops_key = f"{base['model']}@x{args.scale}@{iw}x{ih}"
            export_s = None
            why_skip = runtime_unavailable(base["runtime"], device, base["precision"])
            if why_skip is not None:
                row.update(status="skipped", reason=why_skip)
            elif base["family"] == "peer" and spandrel_error is not None:
                row.update(status="failed", reason=f"spandrel not importable ({spandrel_error}) — {SPANDREL_HINT}")
            else:
                spec = dict(base, input_wh=[iw, ih], output_wh=[ow, oh], warmup=args.warmup, repeat=args.repeat,
                            cache_dir=str(args.cache_dir.resolve()), data_dir=str(args.data.resolve()),
                            flops_g=flops_cache.get(flops_key))
                # Peers build their PyTorch model under --peer-python; their ONNX rows run the file here.
                torch_python = peer_python if base["family"] == "peer" else None
                result: dict[str, Any] = {}
                if base["runtime"] in ONNX_RUNTIMES and not onnx_path_for(spec).is_file():
                    if bar:
                        bar.set_description(f"{label} (ONNX export)")
                    result = run_child(dict(spec, mode="export"), args.timeout, torch_python)
                    if result.get("flops_g") is not None:
                        flops_cache[flops_key] = result["flops_g"]
                    if result.get("params"):
                        params_cache[base["model"]] = result["params"]
                    if result.get("status") == "ok":
                        export_s = result.get("export_s")
                        result = {}
                    else:
                        result["reason"] = f"ONNX export: {result.get('reason')}"
                if not result:
                    spec.update(flops_g=flops_cache.get(flops_key), params=params_cache.get(base["model"]))
                    onnx_ready = base["runtime"] in ONNX_RUNTIMES and onnx_path_for(spec).is_file() \
                        and spec["params"] and spec["flops_g"] is not None
                    result = run_child(spec, args.timeout, None if onnx_ready else torch_python)
                    if export_s is not None:
                        result["export_s"] = export_s
                if result.get("params"):
                    params_cache[base["model"]] = result["params"]
                if result.get("flops_g") is not None:
                    flops_cache[flops_key] = result["flops_g"]
                row.update(result)
                if row.get("status") != "ok" and bar:
                    bar.write(f"{label}: {row['status']}: {row.get('reason')}")
            if row.get("flops_g") is None:
                row["flops_g"] = flops_cache.get(flops_key)
            if row.get("params") is None:  # a failed row still names the model's size when known
                same = [r for r in rows_by_key.values() if r.get("model") == base["model"] and r.get("params")]
                row["params"] = same[0]["params"] if same else None
            add_roofline(row, info.get("matmul_gflops", {}).get("fp32"))
            rows_by_key[key] = row
            measured += 1
            save(plots=False)
            if bar:
                bar.update(1)
    except KeyboardInterrupt:
        print("\ninterrupted: finished rows are saved; rerun the same command to resume", file=sys.stderr)
        save(plots=not args.no_plots)
        return 130
    finally:
        if bar:
            bar.close()
    save(plots=not args.no_plots)
    print(f"{measured} row(s) measured, {kept} kept from a previous run; results in {out}")
    print(markdown_table([rows_by_key[row_key(t)] for t in todo]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
