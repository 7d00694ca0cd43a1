"""fp16 parity of a Core ML package, both ways: fp16 between ops and fp16 inside ops.

Why both: the interpreter's ``"fp16"`` mode (values rounded to fp16 between ops) is what
the program's types promise; its ``"ane"`` mode (fp16 arithmetic and accumulation inside
ops, 8-bit image I/O) is what the Neural Engine does. A package whose ``"fp16"`` row passes
but whose ``"ane"`` row fails overflows or loses precision *inside* an op; the rows name
the PSNR and worst pixel against PyTorch fp32 so the two can be read side by side.

>>> rows = fp16_parity("esc.mlpackage", model, [x])   # doctest: +SKIP
>>> print(format_rows(rows))                           # doctest: +SKIP
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from validation.compare import compare, threshold_for

__all__ = ["FP16_MODES", "ParityRow", "format_rows", "fp16_parity"]

#: Interpreter precisions compared, in the order reported.
FP16_MODES = ("fp16", "ane")


@dataclass(frozen=True)
class ParityRow:
    """One input through one interpreter mode, against the fp32 reference (images in [0, 1])."""

    mode: str
    input: str
    psnr: float
    max_abs: float
    passed: bool


def fp16_parity(package: str | os.PathLike[str], reference: Callable[[torch.Tensor], torch.Tensor],
                inputs: Sequence[torch.Tensor], modes: Sequence[str] = FP16_MODES) -> list[ParityRow]:
    """Run ``package`` in each interpreter mode on ``inputs`` and compare with ``reference(x)``.

    ``reference`` is the fp32 PyTorch model (or any callable giving its outputs). Both sides
    are clamped to [0, 1], as a picture keeps them; ``passed`` applies the fp16 entry of the
    one threshold table (:func:`validation.compare.threshold_for`).
    """
    from ..coreml_runner import CoreMLRunner  # the runner module imports this package

    limit = threshold_for("fp16")
    with torch.no_grad():
        expected = [reference(x.float()).float().clamp(0, 1) for x in inputs]
    rows: list[ParityRow] = []
    for mode in modes:
        runner = CoreMLRunner(package, backend="interpreter", interpreter_precision=mode)
        for i, (x, ref) in enumerate(zip(inputs, expected)):
            name = f"input {i} {tuple(x.shape)}"
            got = runner.infer(x.float()).float().clamp(0, 1)
            result = compare(ref, got, atol=limit.atol, min_psnr=limit.min_psnr, name=name)
            rows.append(ParityRow(mode, name, result.psnr, result.max_abs, result.passed))
    return rows


def format_rows(rows: Sequence[ParityRow]) -> str:
    """A small table: mode, input, PSNR, max abs error, verdict."""
    lines = [f"{'mode':5} {'input':28} {'PSNR dB':>8} {'max abs':>9}  verdict"]
    lines += [f"{r.mode:5} {r.input:28} {r.psnr:8.2f} {r.max_abs:9.2e}  {'pass' if r.passed else 'FAIL'}"
              for r in rows]
    return "\n".join(lines)
