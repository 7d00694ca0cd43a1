"""Measuring: one benchmark row (model, runtime, precision) in a child process of its own.

The parent (:mod:`benchmarks.run`) calls :func:`run_child`, which runs this module as
``python -m benchmarks.measure SPEC.json``; :func:`measure_row` builds the model, exports
it where the runtime needs a file (ONNX through ``export.onnx_export``, TensorRT through
``export.trt_build.build_trt_engine``, Core ML through ``export.coreml_export``: the
builders the ``esc-deploy`` exporters use), times the calls and writes the result. A
fresh process per row keeps one row's allocations, compiled kernels and thread pools out
of the next. Statuses: ``ok``; ``failed`` (with the reason); ``OOM``; ``skipped`` (the
runtime cannot run on this machine: :func:`runtime_unavailable` says why before a child
starts, a child raising :class:`_Skip` says why after). What memory means per device:
``python benchmarks/run.py --help``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
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

#: Runtimes that run the exported ONNX file (exported once per model and size, shared).
ONNX_RUNTIMES = ("onnxruntime", "openvino")

PACKAGES = ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "coremltools", "spandrel",
            "torchvision", "numpy", "matplotlib")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


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


def build_peer(name: str, scale: int, lr_hw: tuple[int, int] | None = None):
    """A light SR peer from spandrel's architecture classes, random weights.

    ``lr_hw``: the input size the peer will run at. SwinIR keeps its shifted-window mask as a
    buffer for its ``img_size`` only; at any other size spandrel's SwinIR builds a float32
    mask on every call, which fp16/bf16 attention refuses ("expected scalar type Float but
    found Half"). Building it for the (window-padded) run size keeps the mask in the model's
    dtype, as SwinIR runs at its own size; the weights are the same either way.
    """
    if name == "swinir_light":
        from spandrel.architectures.SwinIR import SwinIR

        window = 8
        img_size = 64 if lr_hw is None else tuple(-(-side // window) * window for side in lr_hw)
        return SwinIR(upscale=scale, in_chans=3, img_size=img_size, window_size=window, img_range=1.0,
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


#: ``esc+fb48``: the variant in upstream's FlashBias form (rank-48 factors instead of bias tables).
FLASHBIAS_NAME = re.compile(r"^(?P<variant>[a-z0-9_]+)\+fb(?P<rank>[1-9][0-9]*)$")


def parse_model_name(name: str) -> tuple[str, int]:
    """``"esc"`` -> ``("esc", 0)``; ``"esc+fb48"`` -> ``("esc", 48)`` (FlashBias rank; 0: bias tables)."""
    match = FLASHBIAS_NAME.match(name)
    return (match["variant"], int(match["rank"])) if match else (name, 0)


def build_torch_model(spec: dict[str, Any]):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: latency does not depend on them
        if spec["family"] == "esc":
            from models import create_model

            variant, rank = parse_model_name(spec["model"])
            model = create_model(variant, spec["scale"], attention="sdpa", deploy=True, flashbias_rank=rank)
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


def onnx_precision(runtime: str, precision: str) -> str:
    """Which ONNX file a row runs: OpenVINO lowers fp32 graphs itself (INFERENCE_PRECISION_HINT),
    int8 rows run the quantised file, ONNX Runtime fp16 runs an fp16 graph."""
    if precision == "int8":
        return "int8"
    if runtime == "openvino":
        return "fp32"
    return precision


def onnx_path_for(spec: dict[str, Any], precision: str | None = None) -> Path:
    """The cached fixed-shape ONNX file of this row (or of ``precision`` for the same model)."""
    cache = Path(spec["cache_dir"])
    w, h = spec["input_wh"]
    kind = precision or onnx_precision(spec["runtime"], spec["precision"])
    return cache / f"{spec['model']}_x{spec['scale']}_{h}x{w}_{kind}_op18.onnx"


def ensure_onnx(spec: dict[str, Any], model) -> Path:
    """The row's ONNX file, made once and cached: fp32 first, then the int8 or fp16 file from it.

    int8 is quantised from the fp32 file, calibrated on the real pictures of
    ``spec["data_dir"]`` (see :mod:`benchmarks.quality`).
    """
    fp32 = _export_onnx(spec, model, "fp32")
    kind = onnx_precision(spec["runtime"], spec["precision"])
    if kind == "fp32":
        return fp32
    path = onnx_path_for(spec, kind)
    if path.is_file():
        return path
    if kind == "int8":
        from benchmarks.quality import CALIBRATION_SUBDIR, load_inputs, quantize_int8

        w, h = spec["input_wh"]
        pictures = load_inputs(Path(spec["data_dir"]) / CALIBRATION_SUBDIR, h, w)
        return quantize_int8(fp32, path, pictures)
    return _export_onnx(spec, model, kind)


def _export_onnx(spec: dict[str, Any], model, precision: str) -> Path:
    """Export (once, cached) ``model`` at ``precision`` to a fixed-shape ONNX file with export.onnx_export."""
    path = onnx_path_for(spec, precision)
    if path.is_file():
        return path
    if model is None:
        raise RuntimeError(f"{path.name} is missing and no model was built to export it")
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = spec["input_wh"]
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.get("family") == "peer":
                _export_peer_onnx(model, tmp, precision, h, w)
            else:
                from export.onnx_export import export_onnx

                export_onnx(model, tmp, opset=18, precision=precision, shape=f"{h}x{w}", batch=1)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():  # external weights: keep the file next to the renamed graph working
            return tmp
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
        raise
    return path


def _export_peer_onnx(model, path: Path, precision: str, h: int, w: int) -> None:
    """A peer (no ESC descriptor, so not export.onnx_export's job): one fixed shape, weights inside.

    TorchScript's exporter (opset 17): in the peer environment (torch 2.14.1 CUDA build on a
    CPU) the dynamo exporter crashed the process (SIGSEGV in run_decompositions) on SPAN;
    the TorchScript one exports it and ONNX Runtime matches PyTorch within 2e-5. The
    ONNX Runtime / OpenVINO row that runs the file is the check that it works.
    """
    import torch

    dtype = torch.float16 if precision == "fp16" else torch.float32
    torch.onnx.export(model.to(dtype), (torch.rand(1, 3, h, w, dtype=dtype),), str(path), dynamo=False,
                      opset_version=17, input_names=["lr"], output_names=["sr"])


def _sync(torch, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return "outofmemory" in text.replace(" ", "") or "out of memory" in text or "failed to allocate" in text


def _tensorrt_runner(spec: dict[str, Any], model):
    """Build (or reuse) the engine through export/to_trt.py's builder, at exactly the row's input shape."""
    from export.trt_build import ShapeProfile, TrtEnvironmentError, build_trt_engine
    from runtimes.base import load

    w, h = spec["input_wh"]
    shape = (1, 3, h, w)
    stem = Path(spec["cache_dir"]) / f"{spec['model']}_x{spec['scale']}_{h}x{w}_{spec['precision']}.engine"
    try:
        build = build_trt_engine(model, stem, precision=spec["precision"],
                                 profile=ShapeProfile.parse(shape, shape, shape))
    except TrtEnvironmentError as exc:  # no TensorRT / GPU / Triton here: a skipped row, not a failure
        raise _Skip(_first_line(exc)) from exc
    return load(build.engine, device=spec["device"])


def _coreml_runner(spec: dict[str, Any]):
    """Export (once, cached) a fixed-shape .mlpackage through export/to_coreml.py's path and load it."""
    from export.coreml import export_coreml, resolve_config
    from runtimes.base import load

    w, h = spec["input_wh"]
    path = Path(spec["cache_dir"]) / f"{spec['model']}_x{spec['scale']}_{h}x{w}_{spec['precision']}.mlpackage"
    if not path.exists():
        export_coreml(resolve_config(spec["model"], spec["scale"], None, input_size=(h, w),
                                     precision=spec["precision"], output=path))
    return load(path, device="cpu")


def measure_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything for one row (runs inside the child process)."""
    out: dict[str, Any] = {}
    runtime, device, precision = spec["runtime"], spec["device"], spec["precision"]
    t_setup = time.perf_counter()
    onnx_based = runtime in ONNX_RUNTIMES
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

        runner = load(model, device=device, precision=precision, scale=spec["scale"])
        if hasattr(runner.model, "set_dynamic_kernel_form"):  # ESC: the eager fast form (one grouped conv)
            runner.model.set_dynamic_kernel_form("grouped")
            out["dynamic_kernel_form"] = "grouped"
        out["runtime_version"] = torch.__version__
        xin = x.to(dtype)

        def call():
            return runner.model(xin)
    elif runtime == "torch_compile":
        if precision == "fp16" and not device.startswith("cuda"):
            raise RuntimeError("fp16 needs CUDA for PyTorch (CPU half convolutions are missing or slow)")
        net = model.to(device=device, dtype=dtype)
        # One static shape: compiled once here; the timed calls must hit that graph (checked below).
        compiled = torch.compile(net, dynamic=False)
        xin = x.to(dtype)
        out["runtime_version"] = f"{torch.__version__} inductor"

        def call():
            return compiled(xin)

        t0 = time.perf_counter()
        with torch.inference_mode():
            call()  # compiles
        _sync(torch, device)
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        compiles_before = _compiled_frames(torch)
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

            # int8: the QDQ graph carries its own precision; its float parts stay f32.
            runner = load(f"openvino:{path}", device="cpu", precision="fp32" if precision == "int8" else precision)
            out["runtime_version"] = ov.__version__
            _check_openvino_precision(runner, precision)
        close = runner.close

        def call():
            return runner.infer(x)
    elif runtime == "tensorrt":
        runner = _tensorrt_runner(spec, model)
        del model
        out["runtime_version"] = package_version("tensorrt")
        close = runner.close

        def call():
            return runner.infer(x)
    elif runtime == "coreml":
        runner = _coreml_runner(spec)
        del model
        out["runtime_version"] = package_version("coremltools")
        close = runner.close

        def call():
            return runner.infer(x)
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
    if runtime == "torch_compile":
        out["recompiles_while_timed"] = _compiled_frames(torch) - compiles_before
    if precision != "fp32" and runtime in ONNX_RUNTIMES:
        out.update(_cost_vs_fp32(spec, lambda picture: runner.infer(torch.from_numpy(picture))))
    if close is not None:
        close()
    out["latency_median_ms"] = statistics.median(times)
    out["latency_p10_ms"] = _percentile(times, 10)
    out["latency_p90_ms"] = _percentile(times, 90)
    out["status"] = "ok"
    out["reason"] = ""
    return out


def _check_openvino_precision(runner, precision: str) -> None:
    """A bf16/fp16 hint OpenVINO cannot honour (no such instructions) silently runs f32: skip the row."""
    if precision not in ("bf16", "fp16"):
        return
    got = str(runner.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    if precision[-2:] not in got:
        runner.close()
        raise _Skip(f"OpenVINO runs {got} here when asked for {precision}: this CPU lacks the "
                    f"{precision} instructions (AVX512_BF16 / AVX512_FP16 or AMX), so the row would be fp32")


def _compiled_frames(torch) -> int:
    """Frames dynamo has compiled so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _cost_vs_fp32(spec: dict[str, Any], infer) -> dict[str, Any]:
    """PSNR / max error of this row's output against the fp32 ONNX file's (ONNX Runtime) on a
    Set5 x4 picture at the row's input shape; a missing picture folder is reported, not fatal."""
    import numpy as np
    import torch

    from benchmarks.quality import (
        EVALUATION_SUBDIR,
        QualityDataError,
        cost_vs_fp32,
        load_inputs,
    )
    from runtimes.base import load

    w, h = spec["input_wh"]
    try:
        picture = load_inputs(Path(spec["data_dir"]) / EVALUATION_SUBDIR, h, w, limit=1)[0]
    except QualityDataError as exc:
        return {"parity": f"not measured: {exc}"}
    candidate = np.asarray(infer(picture))
    reference_runner = load(onnx_path_for(spec, "fp32"), device="cpu")
    try:
        reference = np.asarray(reference_runner.infer(torch.from_numpy(picture)))
    finally:
        reference_runner.close()
    return cost_vs_fp32(reference, candidate, spec["precision"])


class _Skip(Exception):
    """The runtime cannot run here: the row is 'skipped', not 'failed'."""


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result_path = Path(spec["result_path"])
    try:
        result = measure_row(spec)
    except _Skip as exc:
        result = {"status": "skipped", "reason": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        status = "OOM" if _is_oom(exc) else "failed"
        result = {"status": status, "reason": _first_line(exc), "traceback": traceback.format_exc()[-4000:]}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, result_path)
    return 0


def matmul_rate_gflops(n: int = 2048, repeat: int = 5) -> float:
    """Best-of-``repeat`` rate of one fp32 n x n x n matmul on this machine's threads (GFLOP/s, 2 per FMA).

    The compute floor of a benchmark row is its model FLOPs at this rate: measured in the
    same run as the rows, so a busy or throttled machine lowers both alike. (PyTorch's bf16
    matmul on a CPU without AMX is far slower than fp32, so it is no floor for anything.)
    """
    import torch

    a = torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    b = torch.rand(n, n, generator=torch.Generator().manual_seed(1))
    best = float("inf")
    with torch.inference_mode():
        a @ b
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def machine_info(device: str, weights: str = "random") -> dict[str, Any]:
    """What a results file must say to be merged with others (:mod:`benchmarks.table`)."""
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
        "machine": platform.node(),
        "weights": weights,
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
    info["device_name"] = info.get("gpu") or f"{cpu} ({info['cpu_affinity'] or info['cpu_count']} cores)"
    return info


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


def probe_spandrel(python: str | None = None) -> str | None:
    """None if spandrel imports in a fresh ``python`` (default: this one), else the error's last line."""
    proc = subprocess.run([python or sys.executable, "-c", "import spandrel"], capture_output=True, text=True,
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
            return "tensorrt is not installed (NVIDIA's wheels; GPU machines ship it)"
    if runtime == "coreml":
        if sys.platform != "darwin":
            return f"Core ML prediction needs macOS (this is {platform.system()}); run the benchmark on a Mac"
        if package_version("coremltools") is None:
            return "coremltools is not installed (pip install coremltools)"
        if device.startswith("cuda"):
            return "Core ML does not run on CUDA devices (use --device cpu on a Mac)"
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
    if precision == "bf16" and runtime in ("torch", "torch_compile") and not device.startswith("cuda"):
        return ("PyTorch bf16 convolutions on a CPU without AMX are slower than fp32: a 16-channel 13x13 "
                "convolution at 128x128 measured 7x (channels-last) to 60x (NCHW) slower in oneDNN")
    if precision == "bf16" and runtime == "onnxruntime":
        return "ONNX Runtime's CPU execution provider has no bf16 Conv/MatMul kernels on x86 (OpenVINO's row is the bf16 one)"
    if precision == "int8" and runtime not in ONNX_RUNTIMES:
        return "int8 is post-training quantisation of the ONNX file: ONNX Runtime and OpenVINO rows only"
    return None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_child(spec: dict[str, Any], timeout: float, python: str | None = None) -> dict[str, Any]:
    """Measure one row in a fresh ``python`` (default: this interpreter) and return its result."""
    with tempfile.TemporaryDirectory(prefix="escbench-") as tmp:
        spec = dict(spec, result_path=str(Path(tmp) / "result.json"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [python or sys.executable, "-m", "benchmarks.measure", str(spec_path)]
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


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
