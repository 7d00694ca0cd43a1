"""Compare a runtime's output with a reference, Polygraphy-comparator style.

:func:`compare` checks shape and dtype, then reports per-output error statistics:
maximum, mean and 99th-percentile absolute error, where the maximum occurs, the PSNR
between the two (data range 1.0 by default: outputs are images in [0, 1]) and whether
the comparison passed the given thresholds (``atol`` on the maximum absolute error,
optionally ``min_psnr``).  Everything is computed in float64, so the statistics do not
depend on the compared dtypes.  Any non-finite value (NaN or infinity) on either side
fails the comparison, even where both sides agree: an all-NaN output matched against an
all-NaN reference is a broken model twice, not parity.

>>> result = compare(torch_out, onnx_out, atol=1e-4, name="sr")
>>> result.passed, result.max_abs, result.psnr
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["THRESHOLDS", "ComparisonResult", "Threshold", "compare", "compare_outputs", "threshold_for"]


@dataclass(frozen=True)
class Threshold:
    """Pass criteria for one precision: a bound on the maximum absolute error, and
    optionally a floor on the PSNR between candidate and reference (images in [0, 1])."""

    atol: float
    min_psnr: float | None = None

    def describe(self) -> str:
        text = f"max abs error <= {self.atol:g}"
        return text + (f" and PSNR >= {self.min_psnr:g} dB" if self.min_psnr is not None else "")


#: The one table of parity thresholds by precision: every gate (export checks, runtime
#: parity, TensorRT, Core ML, tests) reads it, so a promise in the README is enforced the
#: same way everywhere. fp32 differs only by summation order (~1e-6 seen, 1e-4 allowed);
#: fp16 keeps 11 significant bits (2e-2 worst pixel, 50 dB overall); bf16 keeps 8 (a whole
#: esc x4 in bf16 on a Set5 crop: max 3.4e-2, 46.6 dB against fp32), so its bounds are looser.
THRESHOLDS: dict[str, Threshold] = {
    "fp32": Threshold(atol=1e-4),
    "fp16": Threshold(atol=2e-2, min_psnr=50.0),
    "bf16": Threshold(atol=1e-1, min_psnr=40.0),
}


def threshold_for(precision: str) -> Threshold:
    """The :data:`THRESHOLDS` entry for ``precision``; a ``ValueError`` names the known ones."""
    try:
        return THRESHOLDS[precision]
    except KeyError:
        raise ValueError(f"no parity threshold for precision {precision!r}; "
                         f"known: {', '.join(THRESHOLDS)}") from None


@dataclass
class ComparisonResult:
    """Statistics of ``candidate - reference`` for one output."""

    name: str
    passed: bool
    shape_ok: bool
    dtype_ok: bool
    reference_shape: tuple[int, ...]
    candidate_shape: tuple[int, ...]
    reference_dtype: str
    candidate_dtype: str
    atol: float
    min_psnr: float | None
    max_abs: float = math.nan
    mean_abs: float = math.nan
    p99_abs: float = math.nan
    psnr: float = math.nan
    worst_index: tuple[int, ...] | None = None
    nonfinite: int = 0
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line, e.g. ``sr: PASSED max 3.1e-06 mean 2.0e-07 p99 1.2e-06 PSNR 121.3 dB``."""
        verdict = "PASSED" if self.passed else "FAILED"
        if not self.shape_ok:
            return f"{self.name}: {verdict} ({'; '.join(self.reasons)})"
        text = (f"{self.name}: {verdict} max {self.max_abs:.3g} mean {self.mean_abs:.3g} "
                f"p99 {self.p99_abs:.3g} PSNR {self.psnr:.2f} dB")
        if self.reasons:
            text += f" ({'; '.join(self.reasons)})"
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inf PSNR becomes the string "inf")."""
        out = asdict(self)
        for key in ("max_abs", "mean_abs", "p99_abs", "psnr"):
            value = out[key]
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = str(value)
        for key in ("reference_shape", "candidate_shape", "worst_index"):
            if out[key] is not None:
                out[key] = list(out[key])
        return out


def _to_numpy(value: Any, role: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{role} must be a numeric array or tensor, got dtype {array.dtype}")
    return array


def psnr_between(reference: np.ndarray, candidate: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB of ``candidate`` against ``reference`` (``inf`` when identical)."""
    diff = candidate.astype(np.float64) - reference.astype(np.float64)
    mse = float(np.mean(diff * diff)) if diff.size else 0.0
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def compare(
    reference: Any,
    candidate: Any,
    atol: float | None = None,
    name: str = "output",
    min_psnr: float | None = None,
    data_range: float = 1.0,
    check_dtype: bool = True,
) -> ComparisonResult:
    """Compare ``candidate`` with ``reference`` (numpy arrays or torch tensors).

    Passes when the shapes match, the dtypes match (unless ``check_dtype=False``),
    every value on both sides is finite, the maximum absolute error is <= ``atol``
    (default: the fp32 entry of :data:`THRESHOLDS`) and, when given, the PSNR is >=
    ``min_psnr``.
    """
    if atol is None:
        atol = THRESHOLDS["fp32"].atol
    ref, cand = _to_numpy(reference, "reference"), _to_numpy(candidate, "candidate")
    result = ComparisonResult(
        name=name, passed=False, shape_ok=ref.shape == cand.shape, dtype_ok=ref.dtype == cand.dtype,
        reference_shape=tuple(ref.shape), candidate_shape=tuple(cand.shape),
        reference_dtype=str(ref.dtype), candidate_dtype=str(cand.dtype), atol=float(atol),
        min_psnr=None if min_psnr is None else float(min_psnr))
    if not result.shape_ok:
        result.reasons.append(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
        return result
    if not result.dtype_ok and check_dtype:
        result.reasons.append(f"dtype mismatch: reference {ref.dtype} vs candidate {cand.dtype}")

    r, c = ref.astype(np.float64), cand.astype(np.float64)
    finite_r, finite_c = np.isfinite(r), np.isfinite(c)
    result.nonfinite = int((~finite_r).sum() + (~finite_c).sum())
    if result.nonfinite:
        result.reasons.append(f"non-finite values: {int((~finite_r).sum())} in the reference, "
                              f"{int((~finite_c).sum())} in the candidate")
    both = finite_r & finite_c
    diff = np.abs(c - r)
    diff = np.where(both, diff, 0.0)
    if diff.size:
        flat_worst = int(np.argmax(diff))
        result.worst_index = tuple(int(i) for i in np.unravel_index(flat_worst, diff.shape))
        result.max_abs = float(diff.reshape(-1)[flat_worst])
        result.mean_abs = float(diff.mean())
        result.p99_abs = float(np.quantile(diff, 0.99))
        result.psnr = psnr_between(np.where(both, r, 0.0), np.where(both, c, 0.0), data_range)
    else:
        result.max_abs = result.mean_abs = result.p99_abs = 0.0
        result.psnr = math.inf
    if result.max_abs > atol:
        result.reasons.append(f"max abs error {result.max_abs:.3g} > atol {atol:.3g}")
    if min_psnr is not None and result.psnr < min_psnr:
        result.reasons.append(f"PSNR {result.psnr:.2f} dB < {min_psnr:.2f} dB")
    result.passed = not result.reasons
    return result


def compare_outputs(
    reference: Mapping[str, Any],
    candidate: Mapping[str, Any],
    atol: float | Mapping[str, float] | None = None,
    min_psnr: float | None = None,
    **kwargs: Any,
) -> dict[str, ComparisonResult]:
    """:func:`compare` for every output name of ``reference`` (a missing one fails).

    ``atol`` may be per output (a mapping; absent names, and ``None``, get the fp32
    entry of :data:`THRESHOLDS`).
    """
    default = THRESHOLDS["fp32"].atol
    results: dict[str, ComparisonResult] = {}
    for key, ref in reference.items():
        tol = atol.get(key, default) if isinstance(atol, Mapping) else (default if atol is None else atol)
        if key not in candidate:
            ref_arr = _to_numpy(ref, "reference")
            results[key] = ComparisonResult(
                name=key, passed=False, shape_ok=False, dtype_ok=False, reference_shape=tuple(ref_arr.shape),
                candidate_shape=(), reference_dtype=str(ref_arr.dtype), candidate_dtype="missing",
                atol=float(tol), min_psnr=min_psnr, reasons=[f"output {key!r} missing from the candidate"])
            continue
        results[key] = compare(ref, candidate[key], atol=tol, name=key, min_psnr=min_psnr, **kwargs)
    return results
