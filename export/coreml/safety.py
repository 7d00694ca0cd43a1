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

from torch import nn

from models.fp16_safety import Fp16UnsafeError

from ..calibration import CalibrationError, Fp16Safety, guard_fp16
from .options import CoreMLExportConfig, CoreMLExportError

__all__ = ["Fp16Safety", "make_safe_for_fp16"]


def make_safe_for_fp16(model: nn.Module, cfg: CoreMLExportConfig) -> tuple[nn.Module, Fp16Safety]:
    """A copy of ``model`` that stays within fp16 on the calibration pictures, and what was found."""
    size = max(cfg.declared_shapes, key=lambda hw: (hw[0] * hw[1], hw))
    try:
        return guard_fp16(model, cfg.calibration_images, size)
    except CalibrationError as exc:
        raise CoreMLExportError(str(exc)) from None
    except Fp16UnsafeError as exc:
        raise CoreMLExportError(f"fp16 safety: {exc} A Core ML fp16 package cannot keep single layers in fp32 "
                                f"on the Neural Engine: export with --precision fp32, or check the pictures "
                                f"(--calibration-images)") from None
