"""Pictures to record activation ranges on, for the fp16 exports' safety check (``models.fp16_safety``).

Why real pictures: whether a network overflows fp16 depends on the activations pictures
produce, not on the weights alone. The default set is scikit-image's sample photographs
(bundled with the package, no download: the quickstart uses them too); a user passes a
folder or files of their own (``--calibration-images DIR``), which is better: ranges from
the pictures the app will see.

Every exporter that writes fp16 can use it: :func:`calibration_pictures` returns
(1, 3, H, W) float32 tensors in [0, 1], optionally centre-cropped (or edge-padded) to one
size, since a fixed-shape package runs at its tile size and ranges are measured there.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from models.errors import ESCError

__all__ = ["DEFAULT_SAMPLES", "PICTURE_SUFFIXES", "CalibrationError", "calibration_pictures", "default_source"]

#: scikit-image sample photographs of the default set (``skimage.data.<name>()``).
DEFAULT_SAMPLES = ("astronaut", "coffee", "chelsea")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class CalibrationError(ESCError, ValueError):
    """The calibration pictures cannot be read (missing folder, no pictures, scikit-image absent)."""


def default_source() -> str:
    """How the summary names the default set."""
    return f"scikit-image samples ({', '.join(DEFAULT_SAMPLES)})"


def _sample_arrays() -> list:
    """The default set as (H, W, 3) float32 arrays in [0, 1] (scikit-image ships them as 8-bit)."""
    try:
        import skimage.data
    except ImportError as exc:
        raise CalibrationError(
            f"the default calibration pictures are scikit-image's sample photographs, and scikit-image does not "
            f"import ({exc}): pip install scikit-image, or pass your own pictures (--calibration-images DIR)") from None
    return [getattr(skimage.data, name)().astype("float32") / 255.0 for name in DEFAULT_SAMPLES]


def _files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES)
        elif item.is_file():
            found.append(item)
        else:
            raise CalibrationError(f"no calibration picture or folder at {item}")
    if not found:
        listed = ", ".join(str(p) for p in paths)
        raise CalibrationError(f"no pictures ({', '.join(PICTURE_SUFFIXES)}) in {listed}; pass a folder of the "
                               f"pictures your app will upscale")
    return found


def _fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre-crop ``x`` to ``size`` (H, W), edge-padding a side that is shorter."""
    h, w = size
    ph, pw = max(0, h - x.shape[-2]), max(0, w - x.shape[-1])
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w].contiguous()


def calibration_pictures(paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                         size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """(1, 3, H, W) float32 pictures in [0, 1]: ``paths`` (files or folders), else the default set.

    ``size``: (height, width) to centre-crop (or edge-pad) every picture to.
    """
    from runtimes.imageio import read_image, to_tensor

    if paths is None:
        pictures = [to_tensor(rgb) for rgb in _sample_arrays()]
    else:
        listed = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        pictures = []
        for path in _files(listed):
            try:
                pictures.append(to_tensor(read_image(path).rgb))
            except (OSError, ValueError) as exc:
                raise CalibrationError(f"cannot read calibration picture {path}: {exc}") from None
    return [_fit(x, size) if size else x for x in pictures]
