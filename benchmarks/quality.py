"""What a lower precision costs: real pictures for int8 calibration and for PSNR against fp32.

A bf16 or int8 row is only worth its speed next to what it does to the picture, so every
such row is also run on a real low-resolution picture and compared, through
:func:`validation.compare.compare` and the one threshold table, with the same model in
fp32. Calibration (int8) and evaluation use different pictures: calibration the
``real_inputs`` folder, evaluation Set5's x4 inputs, so the quantiser never saw the
picture its cost is measured on.

Pictures are cut to the benchmark's fixed input shape: a centre crop, reflected at the
borders where the picture is smaller than the shape.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: Shared, read-only pictures (never copied into the project).
DEFAULT_DATA = ROOT.parent / "shared" / "data"
CALIBRATION_SUBDIR = "real_inputs"
EVALUATION_SUBDIR = "Set5/LR_bicubic/X4"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class QualityDataError(RuntimeError):
    """The picture folder is missing or holds no picture; the message says which flag fixes it."""


def picture_paths(folder: Path) -> list[Path]:
    """The pictures in ``folder`` (sorted), or a :class:`QualityDataError` naming it."""
    if not folder.is_dir():
        raise QualityDataError(f"picture folder {folder} does not exist; pass --data DIR holding "
                               f"{CALIBRATION_SUBDIR}/ and {EVALUATION_SUBDIR}/")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise QualityDataError(f"no pictures ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def fit_to_shape(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) picture -> (1, 3, height, width) float32: centre crop, reflect where too small."""
    h, w = rgb.shape[:2]
    top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
    crop = rgb[top:top + height, left:left + width]
    pad_h, pad_w = height - crop.shape[0], width - crop.shape[1]
    if pad_h or pad_w:
        crop = np.pad(crop, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32)


def load_inputs(folder: Path, height: int, width: int, limit: int | None = None) -> list[np.ndarray]:
    """Up to ``limit`` pictures of ``folder`` fitted to (1, 3, height, width)."""
    from runtimes.imageio import read_image

    return [fit_to_shape(read_image(p).rgb, height, width) for p in picture_paths(folder)[:limit]]


#: Only convolutions are quantised (they hold nearly all of ESC's FLOPs). Quantising every op
#: (attention MatMuls, softmax, the LayerNorm arithmetic) as well cost 14 dB of PSNR against
#: fp32 on esc_light (random weights, a 16x16 Set5 crop) where convolutions alone cost 22 dB.
INT8_OPS = ("Conv",)


def quantize_int8(fp32_onnx: Path, output: Path, calibration: list[np.ndarray]) -> Path:
    """Static int8 post-training quantisation (QDQ, per-channel weights) calibrated on real pictures.

    ONNX Runtime's quantiser writes a QDQ graph that both ONNX Runtime and OpenVINO run
    as int8. Written to a temporary name and moved into place, so a cached file is
    always complete.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(fp32_onnx))
    input_name = model.graph.input[0].name
    untied = untie_conv_initializers(model)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[np.ndarray] = iter(calibration)

        def get_next(self) -> dict[str, Any] | None:
            item = next(self._items, None)
            return None if item is None else {input_name: item}

    tmp = output.with_name(f".{output.stem}.tmp.onnx")
    source = output.with_name(f".{output.stem}.untied.onnx")
    try:
        if untied:
            onnx.save(model, str(source))
        quantize_static(str(source if untied else fp32_onnx), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(INT8_OPS))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
    return output


def untie_conv_initializers(model: Any) -> int:
    """Give every Conv its own copy of a weight or bias it shares with another Conv; returns the copies made.

    Why: ESC-FP's blocks share their large-kernel tensors, and ONNX Runtime's quantiser
    (1.32) then wrote a graph ONNX Runtime refuses ("Duplicate definition of name");
    with one copy per Conv each gets its own quantisation parameters and the graph loads.
    """
    import onnx

    initializers = {t.name: t for t in model.graph.initializer}
    seen: set[str] = set()
    copies = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        for index, name in enumerate(node.input):
            if name not in initializers:
                continue
            if name in seen:
                twin = onnx.TensorProto()
                twin.CopyFrom(initializers[name])
                twin.name = f"{name}__{node.name or copies}"
                model.graph.initializer.append(twin)
                node.input[index] = twin.name
                copies += 1
            seen.add(name)
    return copies


def cost_vs_fp32(reference: np.ndarray, candidate: np.ndarray, precision: str) -> dict[str, Any]:
    """PSNR / max error of ``candidate`` against the fp32 output, judged by the precision's threshold.

    Precisions without an entry in :data:`validation.compare.THRESHOLDS` (int8) get the
    figures and ``parity: "no threshold"`` rather than a pass invented here.
    """
    from validation.compare import THRESHOLDS, compare

    threshold = THRESHOLDS.get(precision)
    result = compare(np.clip(reference, 0, 1), np.clip(candidate, 0, 1), check_dtype=False,
                     atol=threshold.atol if threshold else float("inf"),
                     min_psnr=threshold.min_psnr if threshold else None)
    return {"psnr_vs_fp32_db": round(result.psnr, 2), "max_abs_vs_fp32": round(result.max_abs, 5),
            "parity": ("pass" if result.passed else "FAIL: " + "; ".join(result.reasons)) if threshold
            else "no threshold"}
