"""The one parity path every exporter ends with: load what was written, compare, gate.

Why: an exporter that checks its own in-memory graph proves nothing about the file a
user ships. Here the artifact is opened exactly as a user would open it
(:func:`runtimes.load`), run on the given inputs, and compared with the PyTorch model in
fp32 through :func:`validation.compare.compare` against the one threshold table
(:data:`validation.compare.THRESHOLDS`). Exporters call it on the temporary path before
the atomic move, so a failing artifact never takes the final name.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from models.errors import ESCError
from validation.compare import ComparisonResult, Threshold, compare, threshold_for

__all__ = ["ExportParityError", "reference_outputs", "verify_artifact"]


class ExportParityError(ESCError, ValueError):
    """The written artifact does not compute what the PyTorch model computes."""


@torch.no_grad()
def reference_outputs(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """PyTorch fp32 outputs of ``model`` for ``inputs`` (the model is not modified)."""
    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    device = params[0].device if params else torch.device("cpu")
    if dtype != torch.float32:
        raise ValueError("the parity reference must be an fp32 model; pass the model before any .half()")
    return [model(x.to(device=device, dtype=torch.float32)).float().cpu() for x in inputs]


@torch.no_grad()
def verify_artifact(
    artifact: str | os.PathLike[str],
    reference: torch.nn.Module | Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    precision: str,
    *,
    threshold: Threshold | None = None,
    raise_on_failure: bool = True,
    **load_options: Any,
) -> list[ComparisonResult]:
    """Run ``artifact`` through :func:`runtimes.load` on ``inputs`` and compare with ``reference``.

    ``reference`` is the fp32 PyTorch model or its precomputed outputs. Both sides are
    clamped to [0, 1] (what a picture keeps) and compared in float64. ``threshold``
    defaults to the table's entry for ``precision``. Raises :class:`ExportParityError`
    naming every failing input unless ``raise_on_failure=False``.
    """
    from runtimes import load

    expected = (reference_outputs(reference, inputs) if isinstance(reference, torch.nn.Module)
                else [r.float().cpu() for r in reference])
    limit = threshold or threshold_for(precision)
    results: list[ComparisonResult] = []
    with load(artifact, **load_options) as runner:
        for i, (x, ref) in enumerate(zip(inputs, expected)):
            out = runner.infer(x.float()).float().cpu()
            results.append(compare(ref.clamp(0, 1), out.clamp(0, 1), atol=limit.atol, min_psnr=limit.min_psnr,
                                   name=f"input {i} {tuple(x.shape)}"))
    failed = [r for r in results if not r.passed]
    if failed and raise_on_failure:
        raise ExportParityError(
            f"{os.fspath(artifact)} does not match PyTorch at {precision} ({limit.describe()}): "
            + "; ".join(r.summary() for r in failed)
            + ". Nothing was written under the final name; report this with the command you ran")
    return results
