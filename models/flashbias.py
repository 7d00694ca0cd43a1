"""Convert a bias-table checkpoint (naive/Flex-trained) into upstream's FlashBias form.

Upstream's loader does this when a FlashBias network is given table weights: each block's
dense bias, gathered from its relative-position table, is factored by SVD and the factors
replace the table (``flashbias_q = U_r sqrt(S_r)``, ``flashbias_k = V_r sqrt(S_r)``). The
result is an ordinary FlashBias checkpoint: :func:`models.load_model` recognises it, and at
run time it is exactly what ``attention="flashbias", rank=r`` computes on the table model
(the same :func:`models.attention.factored.factorise_bias`). Below full rank (w^2) outputs
change: each block's :class:`~models.attention.factored.FactorReport` says by how much the
bias does.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping


from .attention.factored import FactorReport, factorise_bias
from .attention.windows import dense_bias
from .errors import CheckpointError, ModelOptionError
from .loader import FLASHBIAS_KEYS, StateDict, read_state_dict

TABLE_KEY = re.compile(r"^(blocks\.\d+\.attn)\.relative_position_bias$")


def to_flashbias(source: str | os.PathLike | Mapping, rank: int) -> tuple[StateDict, list[FactorReport]]:
    """(FlashBias state dict, one report per block) for a table checkpoint at ``rank``.

    ``source``: a checkpoint path or a state dict (wrapped or bare, as :func:`read_state_dict`
    takes). Every other tensor is kept as it is; the block order of the reports is the
    checkpoint's.
    """
    sd = read_state_dict(source)
    if any(key in sd for key in FLASHBIAS_KEYS):
        raise CheckpointError("this checkpoint already holds FlashBias factors (flashbias_q / flashbias_k); "
                              "there is no bias table to convert. Load it as it is.")
    tables = {m.group(1): key for key in sd if (m := TABLE_KEY.match(key))}
    if not tables:
        raise CheckpointError("no relative_position_bias tables found: only ESC-family checkpoints with bias "
                              "tables (esc, esc_light, esc_fp, esc_real, esc_xl) convert to FlashBias.")
    out: StateDict = {}
    reports: list[FactorReport] = []
    for key, tensor in sd.items():
        m = TABLE_KEY.match(key)
        if m is None:
            out[key] = tensor
            continue
        window = (math.isqrt(tensor.shape[1]) + 1) // 2
        tokens = window * window
        if not 1 <= rank <= tokens:
            raise ModelOptionError(f"a FlashBias rank must be between 1 and {tokens} (window {window}: "
                                   f"{tokens} tokens), got {rank}")
        f_q, f_k, report = factorise_bias(dense_bias(tensor.float(), window)[0], rank)
        out[f"{m.group(1)}.flashbias_q"] = f_q.to(tensor.dtype).contiguous()
        out[f"{m.group(1)}.flashbias_k"] = f_k.to(tensor.dtype).contiguous()
        reports.append(report)
    return out, reports


def bias_error_summary(reports: list[FactorReport]) -> dict[str, float]:
    """Worst and mean relative (Frobenius) error of the factored biases, and the worst absolute one."""
    rel = [r.relative_fro_error for r in reports]
    return {"worst_relative_error": max(rel), "mean_relative_error": sum(rel) / len(rel),
            "worst_abs_error": max(r.max_abs_error for r in reports)}
