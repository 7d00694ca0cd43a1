"""Export an ESC model to a Core ML ML program (``.mlpackage``).

Examples (from the repository root)::

    python export/to_coreml.py --model esc --scale 4 --weights ESC_X4.pth --preset m2
    python export/to_coreml.py --model esc_light --weights ESC_light_X4.pth --preset iphone -o esc_light_iphone.mlpackage
    python -m export.to_coreml --model esc --weights ESC_X4.pth --shapes enumerated:64x64,128x128,256x256
    python export/to_coreml.py --model esc --weights ESC_X4.pth --input-size 128x128 --target iOS18 \\
        --precision fp16 --compress palettize4 --image-io

Presets (explicit options override them):

* ``m2``: 128x128 input, macOS 15 target (iOS 18 opset: fused ``scaled_dot_product_attention``),
  fp16; the papers measured a MacBook Air M2 at 128x128.
* ``iphone``: 32x32 input, iOS 17 target (runs on iOS 17 and 18 devices; attention decomposed
  into matmul + softmax), fp16; the papers measured an iPhone 12 at 32x32.

Without ``--weights`` the model gets random weights (fine for latency and conversion checks
only). See :mod:`export.coreml` for what is converted how and what is checked.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import common  # noqa: E402
from export import coreml as ce  # noqa: E402
from export.verify import verify_artifact  # noqa: E402
from validation.compare import threshold_for  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="to_coreml", description="Export an ESC super-resolution model to a Core ML .mlpackage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {name}: {pr.input_size[0]}x{pr.input_size[1]} input, {pr.target}, "
                                         f"{pr.precision} ({pr.device}); {pr.why}" for name, pr in ce.PRESETS.items()))
    common.add_common_args(p, output_help="output .mlpackage (default artifacts/<variant>_x<scale>_<shape>_"
                                          "<target>_<precision>[_<compress>][_image].mlpackage)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--input-size", metavar="HxW", help="fixed input size (default 128x128, or the preset's)")
    shape.add_argument("--shapes", metavar="enumerated:HxW,...",
                       help="enumerated input shapes, multiples of the attention window (32)")
    p.add_argument("--preset", choices=sorted(ce.PRESETS), help="device preset (see below)")
    p.add_argument("--precision", choices=ce.PRECISIONS, help="compute precision (default fp16)")
    p.add_argument("--target", choices=list(ce.TARGETS), help="minimum deployment target (default iOS18)")
    p.add_argument("--image-io", action="store_true",
                   help="image input (0..255, scaled by 1/255) and image output instead of float tensors")
    p.add_argument("--compress", choices=ce.COMPRESSIONS,
                   help="weight compression: k-means palettisation to 4 or 8 bits, or int8 linear")
    p.add_argument("--bias", choices=ce.BIAS_MODES, default="table",
                   help="attention bias: gathered in-graph from the small table (default, small package) "
                        "or stored dense (+16 MB per block)")
    p.add_argument("--verify", action="store_true",
                   help="after export, run the package in the numpy interpreter and compare with PyTorch "
                        f"at every declared shape (fails beyond the parity table: fp32 {threshold_for('fp32').describe()}, "
                        f"fp16 {threshold_for('fp16').describe()}; slow for big inputs)")
    p.add_argument("--verify-image", metavar="PATH",
                   help="image to crop the --verify input from (default: a synthetic pattern)")
    return p


def _verify_input(path: str | None, h: int, w: int):
    import numpy as np
    import torch

    if path:
        from runtimes.imageio import read_image, to_tensor

        x = to_tensor(read_image(path).rgb)
        if x.shape[-2] < h or x.shape[-1] < w:
            x = torch.nn.functional.pad(x, (0, max(0, w - x.shape[-1]), 0, max(0, h - x.shape[-2])), mode="replicate")
        return x[..., :h, :w].contiguous()
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    planes = [0.5 + 0.4 * np.sin(6 * xx + 3 * yy), yy, 0.5 + 0.3 * np.cos(9 * xx * yy)]
    return torch.from_numpy(np.stack(planes).astype(np.float32))[None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = ce.resolve_config(
        args.model, args.scale, args.weights, preset=args.preset, input_size=args.input_size, shapes=args.shapes,
        precision=args.precision, target=args.target, image_io=args.image_io, compress=args.compress,
        bias=args.bias, output=args.output)
    result = ce.export_coreml(cfg)
    rows = ce.summary_rows(result)
    if args.verify:
        inputs = [_verify_input(args.verify_image, h, w) for h, w in cfg.declared_shapes]
        checks = verify_artifact(result.path, result.model, inputs, cfg.precision, raise_on_failure=False,
                                 backend="interpreter")
        for (h, w), res in zip(cfg.declared_shapes, checks):
            # Compressed weights change the model: report, do not judge.
            verdict = "informational (compressed weights)" if cfg.compress else ("ok" if res.passed else "FAILED")
            rows.append((f"verify {h}x{w}", f"interpreter vs PyTorch: max abs {res.max_abs:.2e}, "
                                            f"PSNR {res.psnr:.1f} dB: {verdict}"))
        failed = [res for res in checks if not res.passed]
        if failed and not cfg.compress:
            common.print_summary("Core ML export", rows)
            raise ce.CoreMLExportError(
                f"the package does not reproduce PyTorch ({threshold_for(cfg.precision).describe()}): "
                + "; ".join(res.summary() for res in failed))
    common.print_summary("Core ML export", rows)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
