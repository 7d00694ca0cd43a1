"""The main job on an embedded default: export ESC to ONNX, upscale sample photos, prove parity.

    esc-deploy quickstart [--weights PATH|official:NAME] [--out outputs/quickstart]

1. Loads ESC x4: the given weights, else the official ``ESC_DIV2K_X4`` release asset
   (downloaded once), else, offline, random weights (said loudly: the pictures are then
   meaningless, the parity check is not).
2. Exports it to ONNX (opset 18, dynamic size, simplified, parity-checked).
3. Upscales real photographs that scikit-image ships (bicubic-downscaled by 4, so each
   has a ground truth) through ONNX Runtime and PyTorch, and writes the ONNX results.
4. Prints a parity table: ONNX Runtime vs PyTorch per image, and each vs the original.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.common import print_summary, run_cli  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from models import WeightsDownloadError, create_model, load_model  # noqa: E402
from runtimes.base import load  # noqa: E402
from runtimes.imageio import Image, from_tensor, to_tensor, write_image  # noqa: E402
from validation.compare import compare  # noqa: E402
from validation.imresize import imresize  # noqa: E402
from validation.metrics import psnr  # noqa: E402

SCALE = 4
# Real photographs bundled inside scikit-image (no download), cropped so a 2-core CPU
# finishes in about a minute.
SAMPLES = {"astronaut": (slice(0, 256), slice(128, 384)), "coffee": (slice(0, 192), slice(200, 456)),
           "chelsea": (slice(40, 232), slice(100, 356))}


def sample_images() -> dict[str, np.ndarray]:
    """HR crops (uint8, sides divisible by the scale) of scikit-image's sample photos."""
    import skimage.data

    return {name: getattr(skimage.data, name)()[rows, cols] for name, (rows, cols) in SAMPLES.items()}


def default_model(weights: str | None):
    if weights:
        return load_model(weights), weights
    try:
        return load_model("official:ESC_DIV2K_X4"), "official:ESC_DIV2K_X4"
    except WeightsDownloadError as exc:
        print(f"warning: {exc}\nwarning: continuing with RANDOM weights: the pictures are meaningless, "
              "the parity check is still real.", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_model("esc", SCALE, deploy=True), "random"


EXAMPLES = """examples:
  esc-deploy quickstart                                  # official ESC x4 weights (random when offline)
  python -m apps.quickstart --weights ESC_DIV2K_X4.pth --out outputs/mine"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esc-deploy quickstart", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="checkpoint path or official:NAME (default: official:ESC_DIV2K_X4)")
    parser.add_argument("--out", type=Path, default=Path("outputs/quickstart"), help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    model, source = default_model(args.weights)
    report = export_onnx(model, args.out / "esc_x4.onnx")
    runner = load(report.path)
    rows = []
    for name, hr in sample_images().items():
        lr = np.clip(np.rint(imresize(hr, 1 / SCALE)), 0, 255).astype(np.uint8)
        x = to_tensor(lr.astype(np.float32) / 255)
        with torch.no_grad():
            ref = model(x).clamp(0, 1)
        out = runner.infer(x).clamp(0, 1)
        result = compare(ref, out, atol=1e-4, name=name)
        sr = from_tensor(out)
        write_image(args.out / f"{name}_x4.png", Image(rgb=sr, alpha=None, mode="RGB", bit_depth=8, path=None))
        to255 = lambda a: np.rint(a * 255)  # noqa: E731  (the SR convention: compare 8-bit pictures)
        rows.append((name, f"{lr.shape[1]}x{lr.shape[0]}", f"{result.max_abs:.2e}",
                     f"{psnr(to255(sr), hr, crop_border=SCALE):.2f}",
                     f"{psnr(to255(from_tensor(ref)), hr, crop_border=SCALE):.2f}",
                     "pass" if result.passed else "FAIL"))

    print(f"\n{'image':<10} {'LR':>8} {'max|ort-torch|':>15} {'ORT PSNR':>9} {'torch PSNR':>11} parity")
    for row in rows:
        print(f"{row[0]:<10} {row[1]:>8} {row[2]:>15} {row[3]:>9} {row[4]:>11} {row[5]}")
    passed = all(r[-1] == "pass" for r in rows)
    print_summary("quickstart", [
        ("weights", source), ("onnx", str(report.path)), ("ran", str(runner.describe().get("runtime", runner.name))),
        ("outputs", str(args.out)), ("parity", "PASSED (fp32, max abs <= 1e-4)" if passed else "FAILED"),
        ("next", f"python -m runtimes.upscale IMAGE OUT.png --artifact {report.path}"),
    ])
    return 0 if passed else 1


if __name__ == "__main__":
    run_cli(main)
