"""Export an ESC, ESC-RIB or SST model to ONNX.

Examples (from the repository root)::

    python export/to_onnx.py --weights ESC_DIV2K_X4.pth                      # variant and scale from the weights
    python export/to_onnx.py --model esc --scale 4 --weights official:ESC_DIV2K_X4 --opset 23
    python export/to_onnx.py --weights ESC_light_X4.pth --precision fp16 --fp32-io -o esc_light_fp16.onnx
    python export/to_onnx.py --weights ESC_light_X4.pth --precision fp16 --calibration-images my_photos/
        (fp16 safety ranges recorded on your own pictures; an overflow is refused, naming the layer)
    python export/to_onnx.py --weights ESC_FP_X2.pth --shape 320x240 --batch 1             # 320 wide, 240 tall
    python -m export.to_onnx --model esc_fp --scale 2                          # random weights (warned)
    python export/to_onnx.py --weights ESCRIB_DFLIP_X4.pth --opset 23            # ESC-RIB: mask-free Attention
    python export/to_onnx.py --weights SST_DF2K_X4.pth --opset 23                 # SST (a name with Plus: SST+)

Defaults: dynamic batch, height and width; opset 18 (attention as MatMul/Softmax, split into
16 query slices so ONNX Runtime holds 1/16 of the scores; opset 23 gives one native ONNX
``Attention`` node per attention layer); fp32; simplified with onnxslim under a
parity check; output ``artifacts/<variant>_x<scale>_<attention>_op<opset>_<precision>.onnx``.
The file carries ``esc.*`` metadata (scale, window, precision, weights hash...) that the
runners read. See :mod:`export.onnx_export` for how the export works.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import common  # noqa: E402
from export import onnx_export as ox  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="to_onnx", description="Export an ESC, ESC-RIB or SST super-resolution model to ONNX.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    common.add_common_args(
        p, output_help="output .onnx (default artifacts/<variant>_x<scale>_<attention>_op<opset>_<precision>.onnx)")
    p.add_argument("--attention", choices=(*ox.EXPORTABLE_ATTENTION, "plugin"), default="sdpa",
                   help="attention back-end to export (default sdpa; ESC only: flashbias, a low-rank approximation, "
                        "and plugin, one esc::window_attention node per block for TensorRT, see export/plugin_onnx.py; "
                        "ESC-RIB/SST only: concat, the factor-extended q k^T written out)")
    p.add_argument("--flashbias-rank", type=int, default=None, help="flashbias: rank of the bias factors")
    p.add_argument("--flashbias-energy", type=float, default=None,
                   help="flashbias: share of the bias's energy to keep when no rank is given (default 0.999)")
    p.add_argument("--opset", type=int, choices=ox.CLI_OPSETS, default=18,
                   help="18: MatMul/Softmax attention (any ONNX runtime); 23: native Attention op (default 18)")
    p.add_argument("--precision", choices=ox.PRECISIONS, default="fp32", help="weights and compute (default fp32)")
    p.add_argument("--fp32-io", action="store_true",
                   help="fp16 graph with float32 input/output (Cast nodes at the boundary)")
    p.add_argument("--calibration-images", metavar="DIR",
                   help="fp16: a folder (or file) of your own pictures for the fp16 safety check, which records "
                        "activation ranges on them before export (default: scikit-image's sample photographs)")
    p.add_argument("--shape", default="dynamic",
                   help="'dynamic' (default) or a fixed input size WIDTHxHEIGHT, e.g. 160x120 (160 wide, 120 tall)")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    p.add_argument("--attention-form", choices=ox.ATTENTION_FORMS, default=None,
                   help="attention layout for ONNX Runtime CPU (default: chunked below opset 23, native at 23). "
                        "chunked: each attention split into query slices (1/16 of the score memory, same numbers); "
                        "native: as translated (opset 23: one Attention node per layer, what TensorRT parses); "
                        "mha: com.microsoft.MultiHeadAttention (opset 23)")
    p.add_argument("--attention-chunks", type=int, default=ox.DEFAULT_CHUNKS,
                   help=f"query slices per attention in the chunked form (a divisor of window^2; default "
                        f"{ox.DEFAULT_CHUNKS})")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.add_argument("--exact-dynamic-kernel", action="store_true",
                   help="export the dynamic 3x3 kernel as nine Slice/Mul/Add (slower export, same numbers)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shape = ox.parse_shape(args.shape)          # validate before the (slow) model load
    batch = ox.parse_batch(args.batch)
    if args.fp32_io and args.precision != "fp16":
        print("note: --fp32-io only matters with --precision fp16; the fp32 graph already has float32 I/O",
              file=sys.stderr)
    if args.opset >= ox.NATIVE_ATTENTION_OPSET and args.attention == "naive":
        print("note: --attention naive is explicit MatMul/Softmax at every opset; use sdpa (the default) "
              "for the native Attention op", file=sys.stderr)
    options = {}
    if args.attention == "flashbias":
        if args.flashbias_rank is not None:
            options["rank"] = args.flashbias_rank
        if args.flashbias_energy is not None:
            options["energy"] = args.flashbias_energy
    elif args.flashbias_rank is not None or args.flashbias_energy is not None:
        raise ValueError("--flashbias-rank/--flashbias-energy need --attention flashbias")
    model, sha = common.resolve_weights_arg(args.model, args.scale, args.weights, deploy=False, **options,
                                            attention="sdpa" if args.attention == "plugin" else args.attention)
    output = args.output or ox.default_output_path(model, args.opset, args.precision)
    if args.attention == "plugin" and args.output is None:
        output = output.with_name(output.name.replace("_sdpa_", "_plugin_"))
    if output.suffix != ".onnx":
        print(f"note: {output} does not end in .onnx", file=sys.stderr)

    def progress(message: str) -> None:
        print(f"[to_onnx] {message}...", file=sys.stderr, flush=True)

    if args.attention == "plugin":   # export/plugin_onnx.py: the TensorRT plugin form (not simplified)
        from export.plugin_onnx import export_plugin_onnx

        report = export_plugin_onnx(model, output, opset=args.opset, shape=shape, weights_sha256=sha, batch=batch,
                                    precision=args.precision, progress=progress)
        common.print_summary("ONNX export (plugin form)", report.summary_rows())
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a refused simplification is printed below
        report = ox.export_onnx(model, output, opset=args.opset, precision=args.precision, fp32_io=args.fp32_io,
                                shape=shape, batch=batch, simplify=not args.no_simplify, weights_sha256=sha,
                                compact_dynamic_kernel=not args.exact_dynamic_kernel,
                                attention_form=args.attention_form, attention_chunks=args.attention_chunks,
                                progress=progress, calibration_images=args.calibration_images)
    if not args.no_simplify and not report.simplified:
        print(f"error: {report.simplify_note}", file=sys.stderr)
    common.print_summary("ONNX export", report.summary_rows())
    return 0


if __name__ == "__main__":
    common.run_cli(main)
