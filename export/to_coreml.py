"""Export an ESC model to a Core ML ML program (``.mlpackage``).

Sizes are WIDTHxHEIGHT, as everywhere in the toolkit. Presets (explicit options override
them) give what an app ships: the Neural Engine form (``--form ane``), fp16, image in /
image out, and one static function per app-sized tile (128x128 and 256x256) in a
multifunction package (iOS 18 / macOS 15). ``--paper-size`` takes the preset's Table 9
input size instead (iPhone 32x32, M2 128x128). For Neural Engine targets the exporter
runs the ANE lint and refuses a package that fails it. Without a preset: the portable
``compat`` form, tensor I/O, one 128x128 input.

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
from runtimes.cli_args import format_size  # noqa: E402
from validation.compare import threshold_for  # noqa: E402

EXAMPLES = """\
examples:
  python export/to_coreml.py --model esc --weights ESC_X4.pth --preset m2
      (macOS 15, ANE form, fp16, image I/O, functions tile_128x128 and tile_256x256)
  python export/to_coreml.py --model esc_light --weights ESC_light_X4.pth --preset iphone --paper-size
      (iOS 18, one 32x32 function: the papers' Table 9 iPhone setting)
  python export/to_coreml.py --model esc --weights ESC_X4.pth --preset iphone --tiles 192x128,256x256 --verify
  python export/to_coreml.py --model esc --weights ESC_X4.pth --preset m2 --calibration-images my_photos/
      (fp16 safety ranges recorded on your own pictures)
  python export/to_coreml.py --model esc --weights ESC_X4.pth --preset m2 --large-kernel-pieces --mean-as-conv
      (the two contingencies, if the Mac compute plan shows those ops off the Neural Engine)
  python export/to_coreml.py --model esc --weights ESC_X4.pth --form compat --shapes enumerated:64x64,128x128 --target iOS17
  python export/to_coreml.py --model esc --weights ESC_X4.pth --input-size 160x128 --precision fp32 --verify
"""


def _preset_lines() -> str:
    lines = []
    for name, pr in ce.PRESETS.items():
        tiles = ", ".join(format_size(h, w) for h, w in pr.tiles)
        lines.append(f"  {name}: {pr.device}; tiles {tiles} (Table 9: {format_size(*pr.paper_size)}), "
                     f"{pr.target}, {pr.precision}, ANE form, image I/O; {pr.why}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="to_coreml", description="Export an ESC super-resolution model to a Core ML .mlpackage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets:\n{_preset_lines()}\n\n{EXAMPLES}")
    common.add_common_args(p, output_help="output .mlpackage (default artifacts/<variant>_x<scale>_<shapes>_"
                                          "<target>_<precision>[_ane][_<compress>][_image].mlpackage)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--input-size", metavar="WxH", help="one fixed input size (default 128x128 without a preset)")
    shape.add_argument("--tiles", metavar="WxH,...",
                       help="fixed tile sizes, one static function each (a multifunction package: iOS18/macOS15)")
    shape.add_argument("--shapes", metavar="enumerated:WxH,...",
                       help="enumerated input shapes, multiples of the attention window (32); compat form only")
    shape.add_argument("--paper-size", action="store_true",
                       help="the preset's Table 9 input size (iphone 32x32, m2 128x128) as one fixed shape")
    p.add_argument("--preset", choices=sorted(ce.PRESETS), help="device preset (see below)")
    p.add_argument("--form", choices=ce.FORMS,
                   help="ane: Neural Engine form (rank 4, constant bias, no gathers; presets' default); "
                        "compat: portable form (enumerated shapes, smaller package; default without a preset)")
    p.add_argument("--score-budget", metavar="MIB", default="8",
                   help="ANE form: the largest intermediate one op may make, in MiB of fp16 (default 8); attention "
                        "scores are chunked by windows and queries, FFN hidden maps by channels, and the ANE lint "
                        "refuses a package with a larger tensor")
    p.add_argument("--large-kernel-pieces", action="store_true",
                   help="ANE form contingency: run each 13x13 convolution as four exact 7x7 pieces (turn on if the "
                        "Mac compute plan shows the 13x13 convolutions off the Neural Engine)")
    p.add_argument("--mean-as-conv", action="store_true",
                   help="ANE form contingency: compute the dynamic-kernel estimators' global mean with strided "
                        "constant-weight convolutions (turn on if the compute plan shows reduce_mean off the ANE)")
    p.add_argument("--calibration-images", metavar="DIR",
                   help="fp16 exports: your own pictures (a folder or one file) to record activation ranges on for "
                        "the fp16 safety check (default: scikit-image's sample photographs)")
    p.add_argument("--precision", choices=ce.PRECISIONS, help="compute precision (default fp16)")
    p.add_argument("--target", choices=list(ce.TARGETS), help="minimum deployment target (default iOS18)")
    p.add_argument("--image-io", action=argparse.BooleanOptionalAction, default=None,
                   help="image input (0..255) and image output instead of float tensors (default: on with a preset)")
    p.add_argument("--io-dtype", choices=ce.IO_DTYPES, default="fp32", help="tensor I/O dtype (fp16 needs iOS16+)")
    p.add_argument("--compress", choices=ce.COMPRESSIONS,
                   help="weight compression: k-means palettisation to 4 or 8 bits, or int8 linear")
    p.add_argument("--bias", choices=ce.BIAS_MODES, default="table",
                   help="compat form's attention bias: gathered in-graph from the small table (default, small "
                        "package) or stored dense (+16 MB per block); the ANE form always stores it dense")
    p.add_argument("--verify", action="store_true",
                   help="after export, run every function in the numpy interpreter and compare with PyTorch "
                        f"(fails beyond the parity table: fp32 {threshold_for('fp32').describe()}, "
                        f"fp16 {threshold_for('fp16').describe()}; slow for big tiles)")
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


def verify_rows(result: ce.ExportResult, image: str | None) -> list[tuple[str, str]]:
    """Parity of every declared shape (each on its function); raises when an uncompressed package fails."""
    cfg = result.config
    from tqdm import tqdm

    checks = [ce.function_parity(result.path, result.model, _verify_input(image, h, w), cfg.precision)
              for h, w in tqdm(cfg.declared_shapes, desc="verify (interpreter)", unit="tile", file=sys.stderr)]
    rows = []
    for (h, w), res in zip(cfg.declared_shapes, checks):
        # Compressed weights change the model: report, do not judge.
        verdict = "informational (compressed weights)" if cfg.compress else ("ok" if res.passed else "FAILED")
        rows.append((f"verify {format_size(h, w)}", f"interpreter vs PyTorch: max abs {res.max_abs:.2e}, "
                                                    f"PSNR {res.psnr:.1f} dB: {verdict}"))
    failed = [res for res in checks if not res.passed]
    if failed and not cfg.compress:
        raise ce.PackageParityError(
            f"the package does not reproduce PyTorch ({threshold_for(cfg.precision).describe()}): "
            + "; ".join(res.summary() for res in failed), rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = ce.resolve_config(
        args.model, args.scale, args.weights, preset=args.preset, input_size=args.input_size, shapes=args.shapes,
        tiles=args.tiles, paper_size=args.paper_size, precision=args.precision, target=args.target,
        image_io=args.image_io, io_dtype=args.io_dtype, compress=args.compress, bias=args.bias, form=args.form,
        score_budget=ce.parse_budget(args.score_budget), large_kernel_pieces=args.large_kernel_pieces,
        mean_as_conv=args.mean_as_conv, calibration_images=args.calibration_images, output=args.output)
    result = ce.export_coreml(cfg)
    rows = ce.summary_rows(result)
    if args.verify:
        try:
            rows += verify_rows(result, args.verify_image)
        except ce.PackageParityError as exc:
            common.print_summary("Core ML export", rows + exc.rows)
            raise
    common.print_summary("Core ML export", rows)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
