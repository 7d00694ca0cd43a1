"""Bicubic baseline: upsample a dataset's LR images and score them against HR.

Reproducing the papers' "Bicubic" row (Set5 x4: 28.42 dB) is the cheapest end-to-end
check that our resize, rounding, cropping and Y-channel metrics all follow the SR
convention; model results are only comparable to published ones once this matches.

Layout expected (the usual benchmark layout)::

    DATASET/HR/{name}.png
    DATASET/LR_bicubic/X{s}/{name}x{s}.png

Usage: ``python validation/bicubic_baseline.py --dataset ../shared/data/Set5 --scale 4``
(or ``python -m validation.bicubic_baseline ...``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file: make the repo root importable so `validation` resolves.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from validation.imresize import imresize
from validation.metrics import psnr, ssim


@dataclass(frozen=True)
class ImageScore:
    """Metrics for one image (Y channel, ``scale`` pixels shaved)."""

    name: str
    psnr: float
    ssim: float


def load_rgb(path: Path) -> np.ndarray:
    """Read an image as HxWx3 uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Round half away from zero (as MATLAB does for uint8) and clip to 0..255."""
    return np.clip(np.floor(img + 0.5), 0, 255).astype(np.uint8)


def evaluate(dataset: Path, scale: int) -> list[ImageScore]:
    """Score bicubic x``scale`` upsampling of every LR image in ``dataset``."""
    lr_dir = Path(dataset) / "LR_bicubic" / f"X{scale}"
    hr_dir = Path(dataset) / "HR"
    hr_paths = sorted(hr_dir.glob("*.png"))
    if not hr_paths:
        raise FileNotFoundError(f"no HR/*.png images under {dataset}")
    scores = []
    for hr_path in hr_paths:
        name = hr_path.stem
        lr_path = lr_dir / f"{name}x{scale}.png"
        if not lr_path.is_file():
            raise FileNotFoundError(f"missing LR image {lr_path}")
        lr = load_rgb(lr_path)
        h, w = lr.shape[0] * scale, lr.shape[1] * scale
        # HR sizes that are not multiples of the scale were cropped before downscaling.
        hr = load_rgb(hr_path)[:h, :w]
        sr = to_uint8(imresize(lr, scale=scale))
        scores.append(
            ImageScore(name, psnr(sr, hr, crop_border=scale), ssim(sr, hr, crop_border=scale))
        )
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python validation/bicubic_baseline.py --dataset ../shared/data/Set5 --scale 4")
    parser.add_argument("--dataset", type=Path, required=True, help="folder with HR/ and LR_bicubic/")
    parser.add_argument("--scale", type=int, required=True, choices=(2, 3, 4))
    args = parser.parse_args(argv)

    scores = evaluate(args.dataset, args.scale)
    print(f"bicubic x{args.scale} on {args.dataset} (Y channel, border {args.scale})")
    for s in scores:
        print(f"  {s.name:<12} PSNR {s.psnr:7.3f} dB  SSIM {s.ssim:.4f}")
    mean_psnr = float(np.mean([s.psnr for s in scores]))
    mean_ssim = float(np.mean([s.ssim for s in scores]))
    print(f"  {'mean':<12} PSNR {mean_psnr:7.3f} dB  SSIM {mean_ssim:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
