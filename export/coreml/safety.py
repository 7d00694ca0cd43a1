"""fp16 safety for Core ML fp16 exports: ranges recorded on pictures, LayerNorms rescaled, the rest refused.

Why here: an fp16 package computes in fp16 end to end (the Neural Engine has no fp32, and
the lint refuses fp32 ops in Neural Engine packages), so an activation, a square inside a
LayerNorm or a convolution's running sum that passes 65504 on real pictures breaks the
picture on the device. :func:`models.fp16_safety.make_fp16_safe` measures that on the
fp32 PyTorch model and fixes what can be fixed exactly (a LayerNorm's input scaled by a
power of two, its epsilon by the square). Core ML cannot pin single layers of an fp16
package to fp32 on the Neural Engine, so anything else is refused with the layer's name:
export in fp32 instead. Ranges are recorded at the largest input size the package serves:
per-pixel values do not depend on the tile (attention windows are fixed), and the sums of
the global means grow with the area, so the largest tile is the worst case.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.fp16_safety import Fp16SafetyReport, Fp16UnsafeError, make_fp16_safe
from runtimes.cli_args import format_size

from ..calibration import CalibrationError, calibration_pictures, default_source
from .options import CoreMLExportConfig, CoreMLExportError

__all__ = ["Fp16Safety", "make_safe_for_fp16"]


@dataclass(frozen=True)
class Fp16Safety:
    """The safety report of one export and which pictures it was measured on."""

    report: Fp16SafetyReport
    pictures: str

    def summary(self) -> str:
        """The export summary's row: what was measured and what was done."""
        rep = self.report
        fixed = ", ".join(rep.rescaled) if rep.rescaled else "none needed"
        layer, quantity, value = (rep.largest(1) or [("", "", 0.0)])[0]
        notes = "".join(f"; {note}" for note in rep.notes)
        return (f"{'fp16-safe' if rep.safe else 'NOT fp16-safe'} on {rep.pictures} picture(s) ({self.pictures}), "
                f"headroom x{rep.headroom:g}; LayerNorms rescaled: {fixed}; largest value {value:.4g} "
                f"({layer or '<model>'} {quantity}){notes}")


def make_safe_for_fp16(model: nn.Module, cfg: CoreMLExportConfig) -> tuple[nn.Module, Fp16Safety]:
    """A copy of ``model`` that stays within fp16 on the calibration pictures, and what was found."""
    size = max(cfg.declared_shapes, key=lambda hw: (hw[0] * hw[1], hw))
    try:
        pictures = calibration_pictures(cfg.calibration_images, size)
    except CalibrationError as exc:
        raise CoreMLExportError(str(exc)) from None
    try:
        safe, report = make_fp16_safe(model, pictures, allow_fp32=False, progress=False)
    except Fp16UnsafeError as exc:
        raise CoreMLExportError(f"fp16 safety: {exc} A Core ML fp16 package cannot keep single layers in fp32 "
                                f"on the Neural Engine: export with --precision fp32, or check the pictures "
                                f"(--calibration-images)") from None
    source = str(cfg.calibration_images) if cfg.calibration_images else default_source()
    return safe, Fp16Safety(report, f"{source} at {format_size(*size)}")
