"""Pictures to record activation ranges on, for the fp16 exports' safety check (``models.fp16_safety``).

Why real pictures: whether a network overflows fp16 depends on the activations pictures
produce, not on the weights alone. The default set is scikit-image's sample photographs
(bundled with the package, no download: the quickstart uses them too); a user passes a
folder or files of their own (``--calibration-images DIR``), which is better: ranges from
the pictures the app will see.

Every exporter that writes fp16 goes through :func:`guard_fp16`: pictures from
:func:`calibration_pictures` ((1, 3, H, W) float32 in [0, 1], centre-cropped or
edge-padded to the size the artifact runs at), :func:`models.fp16_safety.make_fp16_safe`
on them, and an :class:`Fp16Safety` whose :meth:`~Fp16Safety.summary` is the export
summary's row. What each format can keep in fp32 differs, so the exporter says which
recorded quantities its graph already computes in fp32 (``fp32_quantities``); every
other problem left after the exact LayerNorm rescaling is refused with the layer's name.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ESCError
from models.fp16_safety import Fp16SafetyReport, Fp16UnsafeError, make_fp16_safe
from runtimes.cli_args import format_size
from runtimes.datasets import IMAGE_SUFFIXES

__all__ = ["DEFAULT_SAMPLES", "PICTURE_SUFFIXES", "CalibrationError", "Fp16Safety", "calibration_pictures",
           "default_source", "guard_fp16"]

#: scikit-image sample photographs of the default set (``skimage.data.<name>()``).
DEFAULT_SAMPLES = ("astronaut", "coffee", "chelsea")
#: What counts as a picture in a calibration folder: the suffixes every dataset reader here accepts.
PICTURE_SUFFIXES = IMAGE_SUFFIXES


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


@dataclass(frozen=True)
class Fp16Safety:
    """The safety report of one export, which pictures it was measured on, what the graph keeps in fp32."""

    report: Fp16SafetyReport
    pictures: str
    #: problems the target's graph computes in fp32 anyway ("layer quantity"), so not refused
    in_fp32: tuple[str, ...] = ()

    def summary(self) -> str:
        """The export summary's row: what was measured and what was done."""
        rep = self.report
        fixed = ", ".join(rep.rescaled) if rep.rescaled else "none needed"
        layer, quantity, value = (rep.largest(1) or [("", "", 0.0)])[0]
        kept = f"; computed in fp32 by the graph: {', '.join(self.in_fp32)}" if self.in_fp32 else ""
        notes = "".join(f"; {note}" for note in rep.notes)
        return (f"fp16-safe on {rep.pictures} picture(s) ({self.pictures}), headroom x{rep.headroom:g}; "
                f"LayerNorms rescaled: {fixed}; largest value {value:.4g} ({layer or '<model>'} {quantity})"
                f"{kept}{notes}")


def guard_fp16(model: nn.Module, images: str | os.PathLike | None, size: tuple[int, int],
               fp32_quantities: Collection[str] = ()) -> tuple[nn.Module, Fp16Safety]:
    """A copy of ``model`` that stays within fp16 on the calibration pictures, and what was found.

    ``images``: the user's pictures (file or folder; None: the default set), measured at
    ``size`` (H, W). ``fp32_quantities``: recorded quantities (``models.fp16_safety``
    names, e.g. ``"sum before mean"``) that the exporter's graph computes in fp32; a
    problem of another kind left after the exact rescaling raises :class:`Fp16UnsafeError`
    naming each layer. :class:`CalibrationError` when the pictures cannot be read.
    """
    pictures = calibration_pictures(images, size)
    safe, report = make_fp16_safe(model, pictures, allow_fp32=True, progress=False)
    refused = [p for p in report.problems if p.quantity not in fp32_quantities]
    if refused:
        listed = "; ".join(p.describe() for p in refused)
        raise Fp16UnsafeError(f"the model overflows fp16 on these pictures and no exact rescaling applies: {listed}.")
    covered = tuple(f"{p.layer or '<model>'} {p.quantity}" for p in report.problems)
    source = str(images) if images else default_source()
    return safe, Fp16Safety(report, f"{source} at {format_size(*size)}", covered)
