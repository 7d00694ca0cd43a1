"""Everything only a GPU can show, from one command, in at most 8 minutes on an H100/H200.

    python benchmarks/gpu_evidence.py --out benchmarks/results/nvidia-h200    # on the GPU machine
    python benchmarks/gpu_evidence.py --dry-run --out /tmp/evidence           # CPU, tiny shapes, < 3 min

Why one command: GPU machines come in short spells (minutes, no network, no TensorRT), so
what needs a GPU is prepared here and run in one go. It writes under ``--out``:

* ``tests.json`` / ``tests.xml``: the GPU-marked tests (the fused Triton kernel against
  the reference in fp32/fp16/bf16 at the full ESC x4 HD shape; the flex back-end against
  the golden outputs), run by pytest in a child process. A skipped test is reported as
  skipped, never as a pass: the section passes only when every test ran and passed.
* ``kernel.json``: window attention alone at the papers' shape (x4 to 1280x720: a
  320x180 map) and at 1920x1080, C = 64, 4 heads, window 32: the fused kernel, SDPA with
  the dense bias, FlexAttention, naive, FlashBias at ranks 16 and 48. Latency from CUDA
  events (median of ``--repeat`` >= 20 calls after a warmup that absorbs compilation),
  the extra peak memory of one call, and the max abs error against the fp32 reference.
* ``models.json``: esc, esc_light, esc_fp, esc_real at x4 to 1280x720 (random weights:
  latency does not depend on them), deployed, for each back-end in fp32/fp16/bf16, with
  peak allocated memory of one forward (weights included); esc and esc_real in upstream's
  FlashBias form too (rank-48 factors as weights: mask-free SDPA); the peers SwinIR-light,
  OmniSR and SPAN from spandrel's architecture classes when spandrel imports; the
  papers' figures beside them and ESC/SwinIR-light ratios.
* ``tensorrt.json``: where ``tensorrt`` imports, the engines ``export/to_trt.py`` builds for
  esc x4 (random weights) -- plugin attention in fp16 and bf16, ``--attention native`` in
  fp16 -- each with its build time, parity against PyTorch fp32 (the one threshold table)
  and latency; otherwise one line saying why none was built.
* ``environment.json``: GPU, driver, CUDA, torch, Triton, spandrel versions.
* ``README.md``: the tables in Markdown.

``--dry-run`` runs the same code on the CPU at tiny shapes (window 16 and bf16 in the
kernel table, Triton's interpreter, one model variant in fp32 without the FlashBias row,
one timed call per row) so CI keeps it working; its files say DRY RUN in
every table and no figure in them is a GPU figure. Rows that cannot run say why
(``out of memory``, ``not measured: ...``); a row that raised is ``error`` and makes the
exit status 1. Rows still waiting when ``--budget-s`` is spent are written as not
measured, so the command ends in time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("esc", "esc_light", "esc_fp", "esc_real")
BACKENDS = ("fused", "sdpa", "flex", "flashbias", "naive")
PEERS = ("swinir_light", "omnisr", "span")
KERNEL_METHODS = ("fused", "sdpa (dense bias)", "flex", "naive", "flashbias r16", "flashbias r48")
MODEL_FLASHBIAS_RANK = 48
GPU_TESTS = ("tests/test_fused_kernel.py", "tests/test_models_golden.py", "tests/test_flashbias.py")
#: Models in upstream's FlashBias form (factors instead of tables, rank 48 as released) and the
#: back-ends that apply to them (mask-free SDPA; naive materialises the product for contrast).
FLASHBIAS_VARIANTS = ("esc", "esc_real")
FLASHBIAS_BACKENDS = ("sdpa", "naive")
DRY_RUN_LABEL = "DRY RUN (CPU, Triton interpreter, tiny shapes): no figure here is a GPU figure"

#: The papers' figures at x4 to 1280x720 on an RTX 4090 (latency ms, peak memory MB).
PAPER_FIGURES: dict[str, dict[str, Any]] = {
    "esc": {"ms": 21.9, "mb": 215, "source": "ESC paper, RTX 4090"},
    "esc_fp": {"ms": 21.7, "mb": 158, "source": "ESC paper, RTX 4090"},
    "swinir_light": {"ms": 222.9, "mb": 351, "source": "ESC paper, RTX 4090"},
    "esc_real/flex": {"ms": 59.9, "mb": None, "source": "ESC paper (ESC-Real, FlexAttention)"},
    "esc_real/flashbias": {"ms": 51.1, "mb": None, "source": "ESC paper (ESC-Real, FlashBias)"},
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures: the GPU plan or its tiny CPU twin (same code, smaller numbers)."""

    dry_run: bool
    device: str
    kernel_sizes: tuple[tuple[int, int], ...]   # (height, width) of the attention map
    window: int
    heads: int
    kernel_dtypes: tuple[str, ...]
    model_lr: tuple[int, int]                   # (height, width) of the LR input
    variants: tuple[str, ...]
    flashbias_variants: tuple[str, ...]
    precisions: tuple[str, ...]
    backends: tuple[str, ...]
    warmup: int
    repeat: int           # timed calls per kernel row
    model_repeat: int     # timed calls per model row

    @classmethod
    def gpu(cls, repeat: int) -> "Plan":
        return cls(False, "cuda", ((180, 320), (1080, 1920)), 32, 4, ("fp16",), (180, 320), VARIANTS,
                   FLASHBIAS_VARIANTS, ("fp16", "fp32", "bf16"), BACKENDS, 5, repeat, 20)

    @classmethod
    def tiny(cls) -> "Plan":
        # No FlashBias model row: its one-off fp64 SVD of the 1024x1024 tables takes minutes on a CPU
        # (the kernel table covers the FlashBias code path at window 16).
        return cls(True, "cpu", ((16, 16), (16, 40)), 16, 2, ("bf16",), (16, 16), ("esc_light",), ("esc_light",),
                   ("fp32",), tuple(b for b in BACKENDS if b != "flashbias"), 0, 1, 1)


# -- measuring ---------------------------------------------------------------------------------------
def measure(fn: Callable[[], Any], plan: Plan, repeat: int, peak: str = "extra") -> dict[str, Any]:
    """Median/min latency of ``fn`` and its peak memory (``extra``: above what was allocated; ``total``).

    CUDA: events around each call (:func:`benchmarks.kernel_bench.time_cuda`) and the
    allocator's peak. CPU (dry run): wall clock, no memory figure.
    """
    import torch

    if plan.device == "cpu":
        for _ in range(plan.warmup):
            fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "peak_mib": None,
                "timer": "wall clock (CPU)", "calls": repeat}
    from benchmarks.kernel_bench import peak_extra_mib, time_cuda

    median_ms, min_ms = time_cuda(fn, plan.warmup, repeat)
    if peak == "extra":
        peak_mib = peak_extra_mib(fn)
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    return {"median_ms": median_ms, "min_ms": min_ms, "peak_mib": peak_mib, "timer": "CUDA events",
            "calls": repeat}


class Unavailable(Exception):
    """What a row needs is not on this machine (spandrel needs torchvision): not measured, not an error."""


def _guarded(row: dict[str, Any], work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``row`` plus what ``work`` measured, or the reason it could not (OOM is not an error)."""
    import torch

    try:
        row.update(work(), status="ok")
    except Unavailable as exc:
        row["status"] = f"not measured: {exc}"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "out of memory"
    except Exception as exc:  # reported in the table and in the exit status, not hidden
        row["status"] = "error"
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


class Budget:
    """Wall-clock budget: rows after it is spent are written as not measured."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds

    def spent(self) -> bool:
        return time.monotonic() > self.deadline

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _progress(rows: list, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(rows, desc=desc, file=sys.stderr, leave=False)


# -- 1. tests ----------------------------------------------------------------------------------------
def run_gpu_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """The GPU-marked tests in a child pytest; every outcome counted, skips never as passes."""
    xml_path = out / "tests.xml"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compiled kernels on a GPU
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
               f"--junitxml={xml_path}", *GPU_TESTS]
    start = time.monotonic()
    try:
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        tail = (run.stdout + run.stderr)[-4000:]
    except subprocess.TimeoutExpired:
        return {"status": "FAILED (timed out)", "command": " ".join(command), "cases": [], "passed": 0,
                "failed": 0, "skipped": 0, "seconds": timeout_s}
    cases = parse_junit(xml_path) if xml_path.is_file() else []
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {"status": tests_status(counts), "command": " ".join(command), "cases": cases, **counts,
            "seconds": round(time.monotonic() - start, 1), "output_tail": tail}


def parse_junit(path: Path) -> list[dict[str, str]]:
    """One ``{"test", "outcome", "detail"}`` per test case of a pytest JUnit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                detail = (node.get("message") or "")[:300]
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "detail": detail})
    return cases


def tests_status(counts: dict[str, int]) -> str:
    """``passed`` only when tests ran and none failed or skipped; a skip is never a pass."""
    if counts["failed"]:
        return "FAILED"
    if counts["skipped"]:
        return f"INCOMPLETE ({counts['skipped']} skipped: not evidence)"
    return "passed" if counts["passed"] else "NOTHING RAN"


# -- 2. the kernel table -----------------------------------------------------------------------------
def kernel_table(plan: Plan, budget: Budget) -> list[dict[str, Any]]:
    """Window attention alone: every method on the same map and table, at each size and dtype."""
    import torch

    from models.attention.backends import (
        FlashBiasBackend,
        FlexBackend,
        NaiveBackend,
        SdpaBackend,
    )
    from models.attention.module import WindowAttention
    from models.kernels.reference import window_attention_reference
    from models.kernels.window_attention_triton import window_attention_triton

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    rows: list[dict[str, Any]] = []
    jobs = [(size, name) for size in plan.kernel_sizes for name in plan.kernel_dtypes]
    for (height, width), dtype_name in _progress(jobs, "kernel table"):
        dtype = dtypes[dtype_name]
        gen = torch.Generator(device=plan.device).manual_seed(0)
        attn = WindowAttention(dim=plan.heads * 16, window=plan.window, heads=plan.heads).to(plan.device, dtype)
        with torch.no_grad():
            attn.relative_position_bias.normal_(0.0, 1.0, generator=gen)
        attn.eval().precompute_bias()   # SDPA and naive get the dense bias, as in the model
        table = attn.relative_position_bias.detach()
        qkv = torch.randn(1, 3 * plan.heads * 16, height, width, device=plan.device, dtype=dtype, generator=gen)
        reference = window_attention_reference(qkv.float(), table.float(), plan.window, plan.heads)
        flex = FlexBackend(compile=not plan.dry_run, allow_cpu=plan.dry_run)
        methods: dict[str, Callable[[], Any]] = {
            "fused": lambda: window_attention_triton(qkv, table, plan.window, plan.heads),
            "sdpa (dense bias)": lambda: SdpaBackend()(qkv, attn),
            "flex": lambda: flex(qkv, attn),
            "naive": lambda: NaiveBackend()(qkv, attn),
            "flashbias r16": lambda b=FlashBiasBackend(rank=16): b(qkv, attn),
            "flashbias r48": lambda b=FlashBiasBackend(rank=48): b(qkv, attn),
        }
        for method in KERNEL_METHODS:
            row = {"size": f"{width}x{height}", "dtype": dtype_name, "method": method}
            if budget.spent():
                rows.append({**row, "status": f"not measured: time budget ({budget.seconds:.0f} s) spent"})
                continue

            def work(fn: Callable[[], Any] = methods[method]) -> dict[str, Any]:
                with torch.inference_mode():
                    err = float((fn().float() - reference).abs().max())
                    return {"max_abs_err": err, **measure(fn, plan, plan.repeat)}

            rows.append(_guarded(row, work))
    return rows


# -- 3. the model table ------------------------------------------------------------------------------
def _model(variant: str, backend: str, plan: Plan, bias: str = "table") -> Any:
    """A random deployed x4 model; ``bias="flashbias"``: upstream's FlashBias form (rank-48 factors)."""
    from models import create_model

    options: dict[str, Any] = {}
    if backend == "flex":
        options = {"compile": not plan.dry_run, "allow_cpu": plan.dry_run}
    if backend == "flashbias":   # a fixed rank: random tables have no low-rank structure to find
        options = {"rank": MODEL_FLASHBIAS_RANK}
    if bias == "flashbias":
        options["flashbias_rank"] = MODEL_FLASHBIAS_RANK
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random weights: latency and memory do not depend on them
        return create_model(variant, 4, attention=backend, deploy=True, device=plan.device, **options)


def model_table(plan: Plan, budget: Budget) -> list[dict[str, Any]]:
    """Whole models at x4 (ESC variants per back-end, then the peers), per precision."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    jobs = []
    for precision in plan.precisions:   # precision-major, peers beside: a spent budget still leaves ratios
        jobs += [(precision, v, "table", b) for v in plan.variants for b in plan.backends]
        jobs += [(precision, v, "flashbias", b) for v in plan.flashbias_variants for b in FLASHBIAS_BACKENDS]
        jobs += [(precision, peer, "-", "-") for peer in PEERS]
    rows: list[dict[str, Any]] = []
    height, width = plan.model_lr
    for precision, name, bias, backend in _progress(jobs, "model table"):
        row = {"model": name, "bias": bias if bias != "flashbias" else f"flashbias r{MODEL_FLASHBIAS_RANK}",
               "backend": backend, "precision": precision, "lr": f"{width}x{height}", "sr": f"{width * 4}x{height * 4}"}
        if budget.spent():
            rows.append({**row, "status": f"not measured: time budget ({budget.seconds:.0f} s) spent"})
            continue

        def work(name: str = name, backend: str = backend, precision: str = precision,
                 bias: str = bias) -> dict[str, Any]:
            if backend == "-":
                from benchmarks.measure import build_peer

                try:
                    net = build_peer(name, 4, lr_hw=(height, width))
                except ImportError as exc:
                    raise Unavailable(f"spandrel is not importable here ({exc})") from exc
            else:
                net = _model(name, backend, plan, bias)
            net = net.to(plan.device, dtypes[precision]).eval()
            x = torch.rand(1, 3, height, width, device=plan.device).to(dtypes[precision])
            with torch.inference_mode():
                result = measure(lambda: net(x), plan, plan.model_repeat, peak="total")
            return {"params": sum(p.numel() for p in net.parameters()), **result}

        rows.append(_guarded(row, work))
    return rows


# -- 4. TensorRT engines ---------------------------------------------------------------------------
#: (precision, attention) of the engines tried when TensorRT imports.
TRT_BUILDS = (("fp16", "plugin"), ("bf16", "plugin"), ("fp16", "native"))
TRT_PROFILE = ("1x3x16x16", "1x3x180x320", "1x3x180x320")   # min, opt, max: the papers' 320x180 LR


def tensorrt_table(plan: Plan, budget: Budget, out: Path) -> dict[str, Any]:
    """Build, check and time the :data:`TRT_BUILDS` engines of esc x4, or say why none was built."""
    if plan.dry_run:
        return {"status": "skipped: dry run (engines need TensorRT and a GPU)", "rows": []}
    try:
        import tensorrt
    except Exception as exc:  # noqa: BLE001 - a broken install is reported like a missing one
        return {"status": f"skipped: TensorRT does not import here ({type(exc).__name__}: {exc})", "rows": []}
    from export import to_trt
    from export import trt_build as tb

    profile = tb.ShapeProfile.parse(*TRT_PROFILE)
    rows: list[dict[str, Any]] = []
    for precision, attention in TRT_BUILDS:
        row = {"model": "esc", "precision": precision, "attention": attention, "profile": profile.describe()}
        if budget.spent():
            rows.append({**row, "status": f"not measured: time budget ({budget.seconds:.0f} s) spent"})
            continue

        def work(precision: str = precision, attention: str = attention) -> dict[str, Any]:
            import copy

            from models import create_model
            from runtimes.trt_runner import TensorRTRunner

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # random weights: the engine is checked against the same model
                model = create_model("esc", 4, attention="sdpa", deploy=False)
            try:
                built = tb.build_trt_engine(model, out / "engines" / f"esc_x4_{attention}_{precision}.engine",
                                            precision=precision, attention=attention, profile=profile)
            except tb.TrtEnvironmentError as exc:
                raise Unavailable(" ".join(exc.missing)) from exc
            reference = copy.deepcopy(model).deploy().to(plan.device).float().eval()
            parity, ok = to_trt.parity_gate(built.engine, reference, tb.synthetic_images(profile), precision)
            with TensorRTRunner(built.engine) as runner:
                latency = tb.benchmark(runner.infer, profile.opt, iterations=plan.model_repeat)
            return {"engine": built.engine.name, "build_s": round(built.build_seconds, 1),
                    "parity": "; ".join(text for _, text in parity), "parity_passed": ok, **latency}

        rows.append(_guarded(row, work))
    return {"status": f"TensorRT {tensorrt.__version__}", "rows": rows}


def tensorrt_markdown(trt: dict[str, Any]) -> str:
    """The README section of :func:`tensorrt_table`."""
    lines = ["", f"## TensorRT engines: {trt['status']}", ""]
    if trt["rows"]:
        lines += ["| model | attention | precision | profile | build s | median ms | parity | status |",
                  "|---|---|---|---|---:|---:|---|---|"]
        lines += [f"| {r['model']} | {r['attention']} | {r['precision']} | {r['profile']} | {_fmt(r.get('build_s'), '.1f')} "
                  f"| {_fmt(r.get('median_ms'))} | {r.get('parity', '')} | {r['status']} {r.get('error', '')} |"
                  for r in trt["rows"]]
    return "\n".join(lines) + "\n"


def paper_key(row: dict[str, Any]) -> str:
    """The :data:`PAPER_FIGURES` entry a model row is compared with (ESC-Real: by attention; its
    FlashBias figure is for the FlashBias form, whatever back-end runs it)."""
    if row["model"] != "esc_real":
        return row["model"]
    return "esc_real/flashbias" if str(row.get("bias", "")).startswith("flashbias") else f"esc_real/{row['backend']}"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ESC / SwinIR-light latency and memory for each precision and back-end both were measured in."""
    swinir = {r["precision"]: r for r in rows if r["model"] == "swinir_light" and r.get("status") == "ok"}
    out = []
    for r in rows:
        peer = swinir.get(r["precision"])
        if r["model"] != "esc" or r.get("bias", "table") != "table" or r.get("status") != "ok" or peer is None:
            continue
        out.append({"precision": r["precision"], "backend": r["backend"],
                    "latency_ratio": r["median_ms"] / peer["median_ms"],
                    "memory_ratio": (r["peak_mib"] / peer["peak_mib"]) if r.get("peak_mib") and peer.get("peak_mib")
                    else None,
                    "paper_latency_ratio": PAPER_FIGURES["esc"]["ms"] / PAPER_FIGURES["swinir_light"]["ms"],
                    "paper_memory_ratio": PAPER_FIGURES["esc"]["mb"] / PAPER_FIGURES["swinir_light"]["mb"]})
    return out


# -- 4. environment ----------------------------------------------------------------------------------
def environment(plan: Plan) -> dict[str, Any]:
    """GPU, driver, CUDA and package versions (the CPU when dry-running)."""
    import torch

    from benchmarks.measure import machine_info, package_version

    info = machine_info(plan.device)
    info["mode"] = "dry-run" if plan.dry_run else "gpu"
    info["torch"], info["cuda"] = torch.__version__, torch.version.cuda
    info["triton"] = package_version("triton")
    info["spandrel"] = package_version("spandrel")
    if plan.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"], info["compute_capability"] = props.name, f"{props.major}.{props.minor}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        # fp32 rows run with PyTorch's defaults: cuDNN convolutions in TF32, matmuls in full fp32.
        info["tf32"] = {"cudnn_conv": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


# -- writing -----------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def markdown(env: dict[str, Any], tests: dict[str, Any], kernel: list[dict], models: list[dict],
             plan: Plan) -> str:
    """The README of an evidence folder: environment, tests, both tables, ratios."""
    title = f"# GPU evidence{' -- ' + DRY_RUN_LABEL if plan.dry_run else ''}"
    lines = [title, "",
             f"- device: {env.get('gpu', env.get('cpu'))}, driver {env.get('driver')}, CUDA {env.get('cuda')}",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, spandrel {env.get('spandrel')}",
             f"- date {env.get('date')}; latency: median of {plan.repeat} (kernel) / {plan.model_repeat} (models) "
             f"timed calls after {plan.warmup} warmup calls",
             "", f"## GPU tests: {tests['status']}", "",
             f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
             f"(`{tests.get('command', '')}`)", ""]
    lines += [f"- {c['outcome']}: {c['test']}" + (f" ({c['detail']})" if c["detail"] else "") for c in tests["cases"]]
    lines += ["", f"## Window attention (C = {plan.heads * 16}, {plan.heads} heads, window {plan.window})", "",
              "| size | dtype | method | median ms | min ms | extra peak MiB | max abs err vs fp32 | status |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    for r in kernel:
        lines.append(f"| {r['size']} | {r['dtype']} | {r['method']} | {_fmt(r.get('median_ms'), '.3f')} | "
                     f"{_fmt(r.get('min_ms'), '.3f')} | {_fmt(r.get('peak_mib'), '.1f')} | "
                     f"{_fmt(r.get('max_abs_err'), '.2e')} | {r['status']} {r.get('error', '')} |")
    lines += ["", "The bias table is random (unit normal): FlashBias's error here says nothing of trained tables.",
              "", f"## Models at x4 (random weights, deployed, FlashBias rank {MODEL_FLASHBIAS_RANK}; peak = allocated "
              f"during one forward, weights included)", "",
              "| model | bias | back-end | precision | LR -> SR | median ms | peak MiB | paper ms | paper MB | status |",
              "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in models:
        paper = PAPER_FIGURES.get(paper_key(r), {})
        lines.append(f"| {r['model']} | {r.get('bias', '-')} | {r['backend']} | {r['precision']} | {r['lr']} -> {r['sr']} | "
                     f"{_fmt(r.get('median_ms'))} | {_fmt(r.get('peak_mib'), '.0f')} | {_fmt(paper.get('ms'), '.1f')} | "
                     f"{_fmt(paper.get('mb'), '.0f')} | {r['status']} {r.get('error', '')} |")
    lines += ["", "Paper figures: RTX 4090, x4 to 1280x720 (ESC paper); ours are on the device above.", "",
              "## ESC / SwinIR-light", "", "| precision | ESC back-end | latency ratio | memory ratio | paper |",
              "|---|---|---:|---:|---|"]
    for r in ratios(models):
        lines.append(f"| {r['precision']} | {r['backend']} | {r['latency_ratio']:.3f} | "
                     f"{_fmt(r['memory_ratio'], '.3f')} | {r['paper_latency_ratio']:.3f} / "
                     f"{r['paper_memory_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Any, plan: Plan) -> None:
    from runtimes.metadata import write_text_atomic

    payload = {"mode": "dry-run" if plan.dry_run else "gpu", "note": DRY_RUN_LABEL if plan.dry_run else "",
               "data": data}
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


# -- main --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpu_evidence", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the evidence into")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, Triton interpreter: checks the code, measures nothing of a GPU")
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per row on the GPU (>= 20; default 30)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole run, tests included; table rows left when it is spent are "
                             "written as not measured (default 420: the run ends within 8 minutes)")
    parser.add_argument("--tests-timeout-s", type=float, default=180.0, help="limit for the GPU tests (default 180)")
    parser.add_argument("--skip-tests", action="store_true", help="tables only")
    return parser


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat < 20 and not args.dry_run:
        parser.error(f"--repeat must be >= 20 on the GPU (a median of fewer calls is noise), got {args.repeat}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run everything; exit 1 when a test failed or was skipped on the GPU, or a row raised."""
    args = _parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"   # before triton is first imported (below, lazily)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); on a CPU machine run with --dry-run, "
              "which checks the code at tiny shapes", file=sys.stderr)
        return 2
    plan = Plan.tiny() if args.dry_run else Plan.gpu(args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(plan)
    write_json(args.out / "environment.json", env, plan)
    budget = Budget(args.budget_s)
    print(f"[gpu_evidence] {env.get('gpu', 'CPU (dry run)')}: GPU tests...", file=sys.stderr, flush=True)
    if args.skip_tests:
        tests = {"status": "not run (--skip-tests)", "cases": [], "passed": 0, "failed": 0, "skipped": 0}
    else:
        tests = run_gpu_tests(args.out, min(args.tests_timeout_s, budget.left()))
    write_json(args.out / "tests.json", tests, plan)
    kernel = kernel_table(plan, budget)
    write_json(args.out / "kernel.json", kernel, plan)
    models = model_table(plan, budget)
    write_json(args.out / "models.json", {"rows": models, "paper": PAPER_FIGURES, "ratios": ratios(models)}, plan)
    trt = tensorrt_table(plan, budget, args.out)
    write_json(args.out / "tensorrt.json", trt, plan)
    from runtimes.metadata import write_text_atomic

    write_text_atomic(args.out / "README.md", markdown(env, tests, kernel, models, plan) + tensorrt_markdown(trt))
    errors = [r for r in kernel + models + trt["rows"] if r["status"] == "error"]
    for r in errors:
        print(f"error row: {r}", file=sys.stderr)
    tests_bad = not args.skip_tests and not plan.dry_run and tests["status"] != "passed"
    print(f"[gpu_evidence] tests {tests['status']}; {len(kernel)} kernel rows, {len(models)} model rows, "
          f"{len(errors)} errors; wrote {args.out}/README.md", file=sys.stderr)
    return 1 if errors or tests_bad else 0


if __name__ == "__main__":
    sys.exit(main())
