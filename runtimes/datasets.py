"""Super-resolution test sets on disk: LR inputs paired with their HR pictures.

Two layouts: the benchmark one (``DIR/LR_bicubic/X{S}/{name}x{S}.png`` beside
``DIR/HR/{name}.png``, as Set5/Set14/Urban100 are distributed) and a flat folder of
pictures (no HR). Used by parity checks and by anything that scores a model on a set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import RunnerError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def hr_for(lr: Path, hr_dir: Path, scale: int) -> Path | None:
    """The HR picture of ``lr`` (``baby_x4.png`` or ``babyx4.png`` -> ``HR/baby.png``), if any."""
    stem = lr.stem
    suffix = f"x{scale}"
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)]
    for ext in IMAGE_SUFFIXES:
        for candidate in (hr_dir / f"{stem}{ext}", hr_dir / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def find_images(dataset: Path, scale: int) -> tuple[str, list[tuple[Path, Path | None]]]:
    """(layout, [(lr, hr or None)]) for a benchmark-layout dataset or a flat folder."""
    if not dataset.is_dir():
        raise RunnerError(f"dataset folder not found: {dataset}")
    lr_dir = dataset / "LR_bicubic" / f"X{scale}"
    if (dataset / "LR_bicubic").is_dir():
        if not lr_dir.is_dir():
            found = sorted(p.name for p in (dataset / "LR_bicubic").iterdir() if p.is_dir())
            raise RunnerError(f"{dataset} has no LR_bicubic/X{scale} (found: {', '.join(found) or 'nothing'}); "
                              f"is --scale {scale} right?")
        hr_dir = dataset / "HR"
        lrs = sorted(p for p in lr_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return "benchmark", [(p, hr_for(p, hr_dir, scale) if hr_dir.is_dir() else None) for p in lrs]
    lrs = sorted(p for p in dataset.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return "flat", [(p, None) for p in lrs]


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W, 3) -> uint8, rounded: the SR evaluation convention."""
    return np.rint(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
