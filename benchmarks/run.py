"""Benchmark ESC models (and light SR peers) across runtimes: one table, like the papers'.

    python benchmarks/run.py --models esc,esc_light,esc_fp --peers swinir_light,omnisr,span \\
        --runtimes torch,torch_compile,onnxruntime,openvino --scale 4 --output-size 1280x720

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

Sizes are WIDTHxHEIGHT (1280x720 is 720p); the input is output / scale.  Models are
random-weight (latency does not depend on the weights).  ONNX files are exported once
at the fixed input shape to ``--cache-dir`` and shared by the ONNX Runtime and OpenVINO
rows.

Outputs in ``--out`` (default ``benchmarks/results/<device-name>/``): results.json (rows
and machine info), results.csv, results.md, latency.png and latency_vs_params.png.  The
JSON is rewritten atomically after every row; a rerun keeps the rows it already has for
the same model / runtime / precision / device / scale / size and measures only the
others (``--fresh`` starts over, ``--retry-failed`` re-measures failed rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.metadata
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtimes.cli_args import SIZE_SYNTAX, parse_size  # noqa: E402

ESC_MODELS = ("esc", "esc_light", "esc_fp", "esc_real", "esc_xl")
PEERS = ("swinir_light", "omnisr", "span")
RUNTIMES = ("torch", "torch_compile", "onnxruntime", "openvino", "tensorrt", "coreml")
PRECISIONS = ("fp32", "fp16")
STATUSES = ("ok", "failed", "OOM", "skipped")
KEY_FIELDS = ("model", "runtime", "precision", "device", "scale", "input_size", "output_size")

COLUMNS = (
    "model", "family", "runtime", "precision", "device", "scale", "input_size", "output_size",
    "params", "flops_g", "latency_median_ms", "latency_p10_ms", "latency_p90_ms", "peak_memory_mb",
    "memory_kind", "setup_s", "export_s", "compile_s", "warmup", "repeat", "status", "reason", "runtime_version",
    "torch_version", "onnxruntime_version", "openvino_version", "threads", "timestamp",
)

PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "coremltools", "spandrel",
            "torchvision", "numpy", "matplotlib")

SPANDREL_HINT = ("install torchvision matching torch (GPU machines ship it) and `pip install -e .[peers]`")


# ==================================================================================
# Small helpers shared by parent and worker
# ==================================================================================


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def row_key(row: dict[str, Any]) -> tuple:
    return tuple(str(row.get(k)) for k in KEY_FIELDS)


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line[:limit]}" if line else type(exc).__name__


# ==================================================================================
# Worker: builds one row in a child process
# ==================================================================================


def _status_file_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _CpuMemory:
    """Peak RSS growth of this process after setup, in MB."""

    def __init__(self) -> None:
        import gc

        gc.collect()
        self.reset_ok = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:  # resets VmHWM to the current RSS
                fh.write("5")
            self.reset_ok = True
        except OSError:
            pass
        self.baseline_kb = _status_file_kb("VmRSS")
        self.peak_kb = self.baseline_kb
        self._stop = False
        self._thread = None
        if not self.reset_ok:  # no resettable high-water mark: sample RSS instead
            import threading

            def sample() -> None:
                while not self._stop:
                    rss = _status_file_kb("VmRSS")
                    if rss is not None and (self.peak_kb is None or rss > self.peak_kb):
                        self.peak_kb = rss
                    time.sleep(0.002)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()

    def stop(self) -> tuple[float | None, str]:
        if self.reset_ok:
            peak = _status_file_kb("VmHWM")
            kind = "cpu_rss_growth(VmHWM)"
        else:
            self._stop = True
            if self._thread is not None:
                self._thread.join()
            peak = self.peak_kb
            kind = "cpu_rss_growth(sampled)"
        if peak is None or self.baseline_kb is None:
            return None, "unavailable"
        return max(0.0, (peak - self.baseline_kb) / 1024.0), kind


def build_peer(name: str, scale: int):
    """A light SR peer from spandrel's architecture classes, random weights."""
    if name == "swinir_light":
        from spandrel.architectures.SwinIR import SwinIR

        return SwinIR(upscale=scale, in_chans=3, img_size=64, window_size=8, img_range=1.0,
                      depths=[6, 6, 6, 6], embed_dim=60, num_heads=[6, 6, 6, 6], mlp_ratio=2,
                      upsampler="pixelshuffledirect", resi_connection="1conv")
    if name == "omnisr":
        from spandrel.architectures.OmniSR import OmniSR

        return OmniSR(num_in_ch=3, num_out_ch=3, num_feat=64, block_num=1, pe=True, window_size=8,
                      res_num=5, up_scale=scale, bias=True)
    if name == "span":
        from spandrel.architectures.SPAN import SPAN

        return SPAN(num_in_ch=3, num_out_ch=3, feature_channels=48, upscale=scale, bias=True)
    raise ValueError(f"unknown peer {name!r}")


def build_torch_model(spec: dict[str, Any]):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: latency does not depend on them
        if spec["family"] == "esc":
            from models import create_model

            model = create_model(spec["model"], spec["scale"], attention="sdpa", deploy=True)
        else:
            model = build_peer(spec["model"], spec["scale"])
    return model.eval().requires_grad_(False), torch


def count_flops(model, x) -> float | None:
    """GFLOPs of one forward at ``x`` (FlopCounterMode: a multiply-add is 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def onnx_path_for(spec: dict[str, Any]) -> Path:
    cache = Path(spec["cache_dir"])
    w, h = spec["input_wh"]
    return cache / f"{spec['model']}_x{spec['scale']}_{h}x{w}_{spec['precision']}_op18.onnx"


def ensure_onnx(spec: dict[str, Any], model) -> Path:
    """Export (once, cached) the model to a fixed-shape ONNX file with export.onnx_export."""
    path = onnx_path_for(spec)
    if path.is_file():
        return path
    try:
        from export.onnx_export import export_onnx
    except ImportError as exc:
        raise RuntimeError(f"export.onnx_export is not importable ({exc})") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = spec["input_wh"]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model, tmp, opset=18, precision=spec["precision"], shape=f"{h}x{w}", batch=1)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():  # external weights: keep the file next to the renamed graph working
            return tmp
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
        raise
    return path


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text or "failed to allocate" in text


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything for one row (runs inside the child process)."""
    out: dict[str, Any] = {}
    runtime, device, precision = spec["runtime"], spec["device"], spec["precision"]
    t_setup = time.perf_counter()
    onnx_based = runtime in ("onnxruntime", "openvino", "tensorrt")
    if spec.get("mode") == "export" or not (onnx_based and spec.get("params") and spec.get("flops_g") is not None
                                            and onnx_path_for(spec).is_file()):
        model, torch = build_torch_model(spec)
        # ESC: parameters as trained (the papers' count; deploy folds drop LayerNorm affines).
        out["params"] = int(model.num_params()) if hasattr(model, "num_params") else \
            int(sum(p.numel() for p in model.parameters()))
    else:  # an ONNX row whose file, params and FLOPs are known: keep PyTorch's memory out of it
        import torch

        model = None
        out["params"] = spec["params"]
    out["torch_version"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    w, h = spec["input_wh"]
    x_cpu = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    if spec.get("flops_g") is None and model is not None:
        try:
            out["flops_g"] = count_flops(model, x_cpu)
        except Exception as exc:  # a missing FLOP formula must not lose the latency row
            out["flops_g"] = None
            out["flops_error"] = _first_line(exc)

    if spec.get("mode") == "export":  # a separate child exports, so the row's child starts clean
        t0 = time.perf_counter()
        ensure_onnx(spec, model)
        out.update(status="ok", reason="", export_s=round(time.perf_counter() - t0, 2))
        return out
    dtype = torch.float16 if precision == "fp16" else torch.float32
    x = x_cpu.to(device)
    close = None
    if runtime == "torch":
        from runtimes.base import load

        runner = load(model, device=device, precision=precision)
        out["runtime_version"] = torch.__version__
        xin = x.to(dtype)

        def call():
            return runner.model(xin)
    elif runtime == "torch_compile":
        if precision == "fp16" and not device.startswith("cuda"):
            raise RuntimeError("fp16 needs CUDA for PyTorch (CPU half convolutions are missing or slow)")
        net = model.to(device=device, dtype=dtype)
        compiled = torch.compile(net)
        xin = x.to(dtype)
        out["runtime_version"] = f"{torch.__version__} inductor"

        def call():
            return compiled(xin)

        t0 = time.perf_counter()
        with torch.inference_mode():
            call()  # compiles
        _sync(torch, device)
        out["compile_s"] = round(time.perf_counter() - t0, 2)
    elif runtime in ("onnxruntime", "openvino"):
        path = ensure_onnx(spec, model)
        out["onnx_file"] = os.path.relpath(path, ROOT) if path.is_relative_to(ROOT) else str(path)
        del model
        from runtimes.base import load

        if runtime == "onnxruntime":
            import onnxruntime as ort

            runner = load(path, device=device)
            out["runtime_version"] = ort.__version__
        else:
            import openvino as ov

            runner = load(f"openvino:{path}", device="cpu", precision=precision)
            out["runtime_version"] = ov.__version__
        close = runner.close

        def call():
            return runner.infer(x)
    elif runtime == "tensorrt":
        path = ensure_onnx(spec, model)
        builder = None
        try:
            from export import trt_export  # type: ignore[attr-defined]

            builder = getattr(trt_export, "build_engine", None)
        except ImportError:
            pass
        if builder is None:
            raise _Skip("no TensorRT engine builder (export.trt_export.build_engine) in this checkout")
        engine = path.with_suffix(".engine")
        if not engine.is_file():
            builder(path, engine, precision=precision)
        from runtimes.base import load

        runner = load(engine, device=device)
        out["runtime_version"] = package_version("tensorrt")
        close = runner.close

        def call():
            return runner.infer(x)
    elif runtime == "coreml":
        raise _Skip("Core ML rows are not wired up beyond the availability check")
    else:
        raise ValueError(f"unknown runtime {runtime}")
    out["setup_s"] = round(time.perf_counter() - t_setup, 2)

    # -- timed calls ------------------------------------------------------------------
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem = None
    else:
        mem = _CpuMemory()
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(spec["warmup"]):
            call()
        _sync(torch, device)
        for _ in range(spec["repeat"]):
            t0 = time.perf_counter()
            result = call()
            _sync(torch, device)
            times.append((time.perf_counter() - t0) * 1000.0)
    expected = (1, 3, spec["output_wh"][1], spec["output_wh"][0])
    if tuple(result.shape) != expected:
        raise RuntimeError(f"output shape {tuple(result.shape)}, expected {expected}")
    if cuda:
        if runtime in ("torch", "torch_compile"):
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["memory_kind"] = "cuda_max_allocated"
        else:
            out["peak_memory_mb"] = None
            out["memory_kind"] = "not measured (outside PyTorch's allocator)"
    else:
        out["peak_memory_mb"], out["memory_kind"] = mem.stop()
    if close is not None:
        close()
    out["latency_median_ms"] = statistics.median(times)
    out["latency_p10_ms"] = _percentile(times, 10)
    out["latency_p90_ms"] = _percentile(times, 90)
    out["status"] = "ok"
    out["reason"] = ""
    return out


class _Skip(Exception):
    """The runtime cannot run here: the row is 'skipped', not 'failed'."""


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result_path"])
    try:
        result = measure(spec)
    except _Skip as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        status = "OOM" if _is_oom(exc) else "failed"
        result = {"status": status, "reason": _first_line(exc), "traceback": traceback.format_exc()[-4000:]}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, result_path)
    return 0


# ==================================================================================
# Parent: grid, resume, outputs
# ==================================================================================


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": {p: package_version(p) for p in PACKAGES},
        "device": device,
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def probe_spandrel() -> str | None:
    """None if spandrel imports in a fresh interpreter, else the error's last line."""
    proc = subprocess.run([sys.executable, "-c", "import spandrel"], capture_output=True, text=True,
                          cwd=ROOT, env=_child_env())
    if proc.returncode == 0:
        return None
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {proc.returncode}"


def runtime_unavailable(runtime: str, device: str, precision: str) -> str | None:
    """Why ``runtime`` cannot run here (a 'skipped' row), or None."""
    if runtime == "tensorrt":
        if not device.startswith("cuda"):
            return "TensorRT needs a CUDA device (run with --device cuda on a GPU machine)"
        if package_version("tensorrt") is None:
            return "tensorrt is not installed"
        if not (ROOT / "runtimes" / "trt_runner.py").is_file():
            return "runtimes/trt_runner.py is not in this checkout"
    if runtime == "coreml":
        if sys.platform != "darwin":
            return f"Core ML prediction needs macOS (this is {platform.system()})"
        return "Core ML rows are not wired up yet"
    if runtime == "openvino":
        if device.startswith("cuda"):
            return "OpenVINO does not run on CUDA devices (use --device cpu)"
        if package_version("openvino") is None:
            return "openvino is not installed (pip install openvino)"
    if runtime == "onnxruntime" and package_version("onnxruntime") is None and \
            package_version("onnxruntime-gpu") is None:
        return "onnxruntime is not installed"
    if precision == "fp16" and runtime in ("torch", "torch_compile") and not device.startswith("cuda"):
        return "fp16 needs CUDA for PyTorch (CPU half-precision convolutions are missing or much slower)"
    return None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="escbench-") as tmp:
        spec = dict(spec, result_path=str(Path(tmp) / "result.json"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_child_env())
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {timeout:.0f} s (--timeout)"}
        result_path = Path(spec["result_path"])
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()][-1:]
        if proc.returncode in (-9, 137):
            return {"status": "OOM" if not spec["device"].startswith("cuda") else "failed",
                    "reason": "child killed (SIGKILL; likely out of host memory)"}
        return {"status": "failed",
                "reason": f"child exited with status {proc.returncode}: {tail[0] if tail else 'no output'}"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fmt_num(value: Any, digits: int = 1) -> str:
    if value is None or value == "":
        return "-"
    try:
        return f"{float(value):,.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def fmt_params(n: Any) -> str:
    if not n:
        return "-"
    return f"{int(n) / 1000:,.0f}K"


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    _atomic_write(path, buf.getvalue())


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | params | FLOPs (G) | runtime | precision | latency ms | memory MB |",
             "|---|---:|---:|---|---|---:|---:|"]
    notes: list[str] = []
    for row in rows:
        if row.get("status") == "ok":
            lat = f"{fmt_num(row.get('latency_median_ms'))} ({fmt_num(row.get('latency_p10_ms'))}–" \
                  f"{fmt_num(row.get('latency_p90_ms'))})"
            mem = fmt_num(row.get("peak_memory_mb"))
        else:
            label = {"failed": "Failed", "OOM": "OOM", "skipped": "skipped"}.get(row.get("status"), "?")
            note = f"{row.get('status')}: {row.get('reason', '')}"
            if note not in notes:  # one footnote per distinct reason
                notes.append(note)
            lat, mem = f"{label}[^{notes.index(note) + 1}]", "-"
        lines.append(f"| {row['model']} | {fmt_params(row.get('params'))} | {fmt_num(row.get('flops_g'))} | "
                     f"{row['runtime']} | {row['precision']} | {lat} | {mem} |")
    if notes:
        lines.append("")
        lines.extend(f"[^{i}]: {text}" for i, text in enumerate(notes, 1))
    return "\n".join(lines)


def write_markdown(data: dict[str, Any], path: Path) -> None:
    info = data["machine"]
    cfg = data.get("config", {})
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    head = [
        f"# ESC benchmark: {info.get('gpu') or info['cpu']}",
        "",
        f"x{cfg.get('scale')} to {cfg.get('output_size')} (input {cfg.get('input_size')}), batch 1, device "
        f"{info['device']}, {info.get('cpu_affinity') or info['cpu_count']} cores; warmup {cfg.get('warmup')}, "
        f"repeat {cfg.get('repeat')}; latency is the median (p10–p90); memory is "
        + ("peak allocated by PyTorch." if str(info["device"]).startswith("cuda")
           else "peak RSS growth over the process after setup."),
        f"FLOPs: torch.utils.flop_counter (a multiply-add = 2 FLOPs). Random weights. {info['date']}.",
        "",
        f"Versions: {versions}.",
        "",
    ]
    _atomic_write(path, "\n".join(head) + "\n" + markdown_table(data["rows"]) + "\n")


def write_plots(rows: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get("latency_median_ms") is not None]
    models = list(dict.fromkeys(r["model"] for r in ok))
    missing = [m for m in dict.fromkeys(r["model"] for r in rows) if m not in models]
    series = list(dict.fromkeys(f"{r['runtime']} {r['precision']}" for r in ok))
    written = []

    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(models) * max(1, len(series)) + 2), 4.5))
    if missing:
        fig.text(0.01, 0.01, f"no successful rows (see results.md): {', '.join(missing)}", fontsize=7)
    width = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        xs, ys = [], []
        for i, model in enumerate(models):
            match = [r for r in ok if r["model"] == model and f"{r['runtime']} {r['precision']}" == name]
            if match:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(match[0]["latency_median_ms"])
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models)
    ax.set_ylabel("latency, median (ms)")
    if ok and max(r["latency_median_ms"] for r in ok) / max(1e-9, min(r["latency_median_ms"] for r in ok)) > 30:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=120)
    plt.close(fig)
    written.append("latency.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^v<>px*"
    for j, name in enumerate(series):
        pts = [r for r in ok if f"{r['runtime']} {r['precision']}" == name and r.get("params")]
        if not pts:
            continue
        ax.scatter([r["params"] / 1e3 for r in pts], [r["latency_median_ms"] for r in pts],
                   marker=markers[j % len(markers)], label=name)
        for r in pts:
            ax.annotate(r["model"], (r["params"] / 1e3, r["latency_median_ms"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters (K)")
    ax.set_ylabel("latency, median (ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    if ok:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_params.png", dpi=120)
    plt.close(fig)
    written.append("latency_vs_params.png")
    return written


def write_outputs(data: dict[str, Any], out: Path, plots: bool) -> None:
    _atomic_write(out / "results.json", json.dumps(data, indent=1, default=str) + "\n")
    write_csv(data["rows"], out / "results.csv")
    write_markdown(data, out / "results.md")
    if plots:
        cfg = data["config"]
        where = data["machine"].get("gpu") or data["machine"]["cpu"]
        write_plots(data["rows"], out, f"x{cfg['scale']} to {cfg['output_size']} on {where}")


def _names(text: str, valid: tuple[str, ...], what: str, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in valid]
    if unknown:
        parser.error(f"unknown {what} {', '.join(unknown)}; choose from: {', '.join(valid)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="esc,esc_light,esc_fp",
                   help=f"comma-separated ESC variants ({', '.join(ESC_MODELS)}) or 'none'. Default: %(default)s")
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
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

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
        spandrel_error = probe_spandrel()

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
            row = dict(base, warmup=args.warmup, repeat=args.repeat, torch_version=info["versions"]["torch"],
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
                            cache_dir=str(args.cache_dir.resolve()), flops_g=flops_cache.get(flops_key))
                result: dict[str, Any] = {}
                if base["runtime"] in ("onnxruntime", "openvino", "tensorrt") and not onnx_path_for(spec).is_file():
                    if bar:
                        bar.set_description(f"{label} (ONNX export)")
                    result = run_child(dict(spec, mode="export"), args.timeout)
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
                    result = run_child(spec, args.timeout)
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
