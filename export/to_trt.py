"""Build a TensorRT engine for an ESC model (ONNX export, engine build, parity, latency).

Examples (from the repository root)::

    python export/to_trt.py --weights ESC_DIV2K_X4.pth                          # fp16, plugin attention
    python export/to_trt.py --weights official:ESC_DIV2K_X4 --precision bf16 -o engines/esc_x4.engine
    python export/to_trt.py --weights ESC_light_X4.pth --min-shape 1x3x64x64 --opt-shape 4x3x256x256 \\
        --max-shape 8x3x512x512
    python export/to_trt.py --weights ESC_DIV2K_X4.pth --opt-shape 320x180 --max-shape 640x360   # WIDTHxHEIGHT
    python export/to_trt.py --weights ESC_DIV2K_X2.pth --attention native --precision fp16   # ONNX Attention op
    python export/to_trt.py --weights ESC_DIV2K_FB_R48_X2.pth     # FlashBias weights: native, mask-free attention
    python -m export.to_trt --model esc --scale 4 --dry-run                      # random weights, no build

Steps: (1) the ONNX file the engine is built from, next to the engine: ``--attention auto``
(the default) is ``plugin`` for weights with bias tables and ``native`` for bias-free ones
(FlashBias checkpoints, ESC-RIB, SST: their attention needs no mask, so no plugin). ``plugin``
writes the plugin form, one ``esc::window_attention`` node per block that TensorRT runs
through a Python plugin whose ahead-of-time implementation embeds the fused Triton
kernel in the engine; ``native`` writes opset 23 with ONNX's ``Attention`` op. (2) the
engine: strongly typed (the precision is the graph's), one optimisation profile over
``lr``, a timing cache next to it; its file name encodes precision, shape range,
TensorRT version, GPU and ONNX hash, and an engine is reused only on an exact name
match. (3) parity against PyTorch fp32 on a few pictures (the one threshold table,
``validation.compare.THRESHOLDS``) and a latency summary. Steps 1-2 are
``export.trt_build.build_trt_engine``, which benchmarks call too.

Profile shapes are TensorRT's NxCxHxW (``1x3x180x320``: batch, channels, height, width) or
the toolkit's size syntax WIDTHxHEIGHT with batch 1 (``320x180`` is the same shape). The
max shape is checked against the fused kernel's launch limits before anything is exported.

Without TensorRT or a GPU the ONNX file is still written, what is missing is printed with
how to install it, and the exit status is 2. ``--dry-run`` stops before the build (exit 0).
Run the engine with ``python -m runtimes.upscale IN OUT --artifact <engine> --device cuda``
or, for AOT engines, ``trtexec --loadEngine=<engine> --shapes=lr:1x3x256x256``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a file: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import common  # noqa: E402
from export import trt_build as tb  # noqa: E402
from runtimes.cli_args import SIZE_SYNTAX  # noqa: E402

EXIT_CANNOT_BUILD = 2
EXIT_PARITY_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="to_trt", description="Build a TensorRT engine for an ESC super-resolution model.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    common.add_common_args(p, output_help="engine path stem (default artifacts/<variant>_x<scale>_<attention>_"
                                          "<precision>.engine); the file written is <stem>.<tag>.engine")
    p.add_argument("--precision", choices=tb.PRECISIONS, default="fp16", help="engine precision (default fp16)")
    p.add_argument("--attention", choices=("auto", *tb.ATTENTION_MODES), default="auto",
                   help="plugin: fused Triton kernel as a TensorRT plugin; native: ONNX Attention (opset 23); auto "
                        "(default): plugin for bias tables, native for bias-free weights (FlashBias, ESC-RIB, SST)")
    shape_forms = f"NxCxHxW or {SIZE_SYNTAX} (batch 1)"
    p.add_argument("--min-shape", default=None, help=f"profile min, {shape_forms} (default 1x3x16x16)")
    p.add_argument("--opt-shape", default=None,
                   help=f"profile opt, {shape_forms} (default 1x3x256x256, within min..max)")
    p.add_argument("--max-shape", default=None, help=f"profile max, {shape_forms} (default 4x3x512x512)")
    p.add_argument("--typing", choices=tb.TYPINGS, default="strong",
                   help="strong: precision in the graph (default; the only mode in TensorRT 11); weak: fp32 graph "
                        "+ FP16/BF16 builder flags (TensorRT 10)")
    p.add_argument("--jit", action="store_true",
                   help="use the plugin's JIT (Python) implementation instead of the AOT kernel")
    p.add_argument("--dry-run", action="store_true", help="export and check everything, do not build (exit 0)")
    p.add_argument("--rebuild", action="store_true", help="build even if an engine with the same name exists")
    p.add_argument("--reexport", action="store_true", help="export the ONNX file even if a matching one exists")
    p.add_argument("--workspace", type=float, default=None, help="builder workspace limit in GiB")
    p.add_argument("--ptx-target", default=None,
                   help="PTX target of the plugin's AOT kernel, e.g. cuda:90 (default: this GPU, else cuda:90)")
    p.add_argument("--ptx-version", type=int, default=None,
                   help="PTX ISA version of the AOT kernel, e.g. 84 for 8.4 (default: what the driver accepts)")
    p.add_argument("--images", type=Path, default=None, help="folder of pictures for the parity check "
                                                              "(default: synthetic pictures)")
    p.add_argument("--iterations", type=int, default=30, help="latency iterations (default 30)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def _progress(message: str) -> None:
    print(f"[to_trt] {message}...", file=sys.stderr, flush=True)


def dry_run_kernel(metadata: Any, ptx_target: str | None, ptx_version: int | None) -> tuple[Any, str]:
    """``(compiled kernel, target)``: the AOT kernel the build would embed for this ONNX file.

    Same target and PTX-version resolution as the build's registration
    (:func:`runtimes.plugin_ops.tensorrt_plugin.aot_options`: flags, environment, this
    GPU, the driver's PTX cap) and the same compile call, so the dry run reports the
    very PTX the engine would hold.
    """
    from runtimes.plugin_ops import tensorrt_plugin

    target, ptx_cap = tensorrt_plugin.aot_options(ptx_target, ptx_version)
    window, heads = int(metadata.get("plugin_window", "0")), int(metadata.get("plugin_heads", "0"))
    return tensorrt_plugin.compile_kernel(metadata.precision or "fp32", window, heads, target=target,
                                          ptx_version=ptx_cap), target


def _ptx_row(args: argparse.Namespace, step: tb.OnnxStep) -> tuple[str, str]:
    """Compile the plugin's AOT kernel (no GPU needed) as the dry run's last check."""
    if args.attention != "plugin" or args.jit:
        return ("AOT kernel", "not used")
    from runtimes.plugin_ops.tensorrt_plugin import AOT_PARAMS, aot_ptx

    try:
        kernel, target = dry_run_kernel(step.metadata, args.ptx_target, args.ptx_version)
        ptx = aot_ptx(kernel)
    except Exception as exc:  # report, do not fail the dry run: the build would say the same
        return ("AOT kernel", f"NOT compiled: {type(exc).__name__}: {exc}")
    version = ptx.split(".version", 1)[-1].split()[0] if ".version" in ptx else "?"
    return ("AOT kernel", f"{kernel.metadata.name} compiled to PTX {version} for {target} "
                          f"({len(ptx)} chars, {AOT_PARAMS} parameters, {kernel.metadata.num_warps} warps, "
                          f"{kernel.metadata.shared} B shared memory): what the build embeds")


def parity_gate(engine: Any, reference: Any, images: list, precision: str,
                device: str = "cuda") -> tuple[list[tuple[str, str]], bool]:
    """Run ``engine`` on ``images`` against the fp32 ``reference``: (summary rows, passed).

    The one threshold table decides (:func:`validation.compare.threshold_for`); any
    artifact :func:`runtimes.load` opens can be gated, which is how the tests show a
    corrupted one failing without TensorRT.
    """
    from export.verify import verify_artifact
    from validation.compare import threshold_for

    parity = verify_artifact(engine, reference, images, precision, raise_on_failure=False, device=device)
    rows = [(f"parity {r.name}", f"PSNR {r.psnr:.1f} dB, max abs {r.max_abs:.2e} vs PyTorch fp32"
             + ("" if r.passed else f"  FAILED (needs {threshold_for(precision).describe()})")) for r in parity]
    return rows, bool(parity) and all(r.passed for r in parity)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    profile = tb.ShapeProfile.parse(args.min_shape, args.opt_shape, args.max_shape)   # before the slow load
    if args.iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {args.iterations}")
    model, sha = common.resolve_weights_arg(args.model, args.scale, args.weights, attention="sdpa", deploy=False)
    if args.attention == "auto":
        args.attention = "plugin" if model.descriptor.bias == "table" else "native"
        print(f"[to_trt] --attention {args.attention} ({model.descriptor.bias} weights)", file=sys.stderr, flush=True)
    output = args.output or tb.default_output(model, args.precision, args.attention)
    if output.suffix not in (".engine", ".plan"):
        print(f"note: {output} does not end in .engine; the engine is written as {output.name}.<tag>.engine",
              file=sys.stderr)

    try:
        result = tb.build_trt_engine(
            model, output, precision=args.precision, attention=args.attention, profile=profile, typing=args.typing,
            weights_sha256=sha, jit=args.jit, reexport=args.reexport, rebuild=args.rebuild, dry_run=args.dry_run,
            workspace_gib=args.workspace, ptx_version=args.ptx_version, ptx_target=args.ptx_target,
            verbose=args.verbose, progress=_progress)
    except tb.TrtEnvironmentError as exc:
        if not exc.onnx.reused:
            common.print_summary("ONNX for TensorRT", exc.onnx.rows)
        print(f"error: cannot build the TensorRT engine on this machine. The {args.attention}-form ONNX file is "
              f"ready: {exc.onnx.path}", file=sys.stderr)
        for item in exc.missing:
            print(f"  missing: {item}", file=sys.stderr)
        again = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
        print(f"  then run again on a machine with TensorRT and an NVIDIA GPU: python export/to_trt.py {again}",
              file=sys.stderr, flush=True)
        return EXIT_CANNOT_BUILD
    step, engine = result.onnx, result.engine
    if not step.reused:
        common.print_summary("ONNX for TensorRT", step.rows)

    if args.dry_run:
        plan_rows = result.plan_rows(args.precision, args.typing, args.attention, args.jit)
        plan_rows.append(_ptx_row(args, step))
        missing = result.environment.missing(args.attention)
        if missing:
            plan_rows.append(("to build", "\n".join(f"missing: {m}" for m in missing)))
        common.print_summary("TensorRT build plan (dry run: nothing built)", plan_rows)
        return 0

    # -- parity and latency ---------------------------------------------------------------------------
    import torch

    from runtimes.trt_runner import TensorRTRunner
    from validation.compare import threshold_for

    _progress("checking parity against PyTorch fp32")
    reference = copy.deepcopy(model).deploy().to("cuda").float().eval()
    images = tb.load_images(args.images, profile) if args.images else tb.synthetic_images(profile)
    parity_rows, ok = parity_gate(engine, reference, images, args.precision)
    runner = TensorRTRunner(engine, device="cuda")
    _progress("measuring latency")
    opt = profile.opt
    trt_latency = tb.benchmark(runner.infer, opt, iterations=args.iterations)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    torch_model = reference.to(torch_dtype)
    torch_latency = tb.benchmark(lambda x: torch_model(x), opt, iterations=args.iterations, dtype=torch_dtype)
    megapixels = opt[0] * opt[2] * opt[3] * runner.scale ** 2 / 1e6
    rows = [
        ("engine", f"{engine}" + (f" (built in {result.build_seconds:.0f} s)" if result.built else " (reused)")),
        ("onnx", str(step.path)),
        ("profile", f"lr {profile.describe()}"),
        ("build", f"{args.precision}, {args.typing} typing, {args.attention} attention, TensorRT "
                  f"{result.environment.tensorrt_version}, {result.environment.gpu_name}"),
        *parity_rows,
        ("latency", f"TensorRT {trt_latency['median_ms']:.2f} ms median (p90 {trt_latency['p90_ms']:.2f}) at "
                    f"{'x'.join(map(str, opt))}, {megapixels / (trt_latency['median_ms'] / 1e3):.1f} output MP/s; "
                    f"PyTorch {args.precision} eager {torch_latency['median_ms']:.2f} ms"),
        ("use", f"python -m runtimes.upscale INPUT OUTPUT --artifact {engine} --device cuda"),
    ]
    common.print_summary("TensorRT engine", rows)
    runner.close()
    if not ok:
        print(f"error: the engine does not match PyTorch at {args.precision} "
              f"({threshold_for(args.precision).describe()}; see above)", file=sys.stderr)
        return EXIT_PARITY_FAILED
    return 0


if __name__ == "__main__":
    common.run_cli(main)
