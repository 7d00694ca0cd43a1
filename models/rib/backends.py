"""Attention back-ends for RIB layers: what runs between ``to_qkv`` and the gate.

Each takes the qkv map (B, 3C, Hp, Wp), already padded to whole windows, and the
:class:`RIBAttention` module, and returns (B, C, Hp, Wp). The score of every back-end is
``(q k^T + F_q F_k^T) / sqrt(d)`` with the module's factors (see
:func:`models.rib.positional.positional_factors`):

- ``sdpa``: q, k, v extended by the factors (v by zeros) and padded to a multiple of 8,
  then one mask-free ``F.scaled_dot_product_attention``. Equal head dimensions and no
  mask are what a flash kernel needs (on GPU; on CPU it keeps the blocked kernel rather
  than the one that materialises w^4 scores).
- ``naive``: explicit ``q k^T``, plus the dense (N x N) bias ``F_q F_k^T``, fp32 softmax:
  the reference, and the form that shows what the factors stand for.
- ``concat``: the concatenated-factor form written out: one matmul over the extended q
  and k, fp32 softmax, then v. What an exporter's decomposed attention computes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention.backends import AttentionBackend
from ..attention.factored import extend, factored_sdpa
from ..attention.windows import merge, partition
from ..errors import AttentionBackendError

if TYPE_CHECKING:
    from .attention import RIBAttention


class RIBBackend(AttentionBackend):
    """Splits the padded map into windows, runs :meth:`core`, joins the windows."""

    def __call__(self, qkv: torch.Tensor, attn: RIBAttention) -> torch.Tensor:  # type: ignore[override]
        q, k, v = partition(qkv, attn.window, attn.heads)
        f_q, f_k = (f.to(q.dtype) for f in attn.factors())
        out = self.core(q, k, v, f_q, f_k, attn.head_dim ** -0.5)
        return merge(out, qkv.shape[0], qkv.shape[-2], qkv.shape[-1], attn.window)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f_q: torch.Tensor, f_k: torch.Tensor,
             scale: float) -> torch.Tensor:
        raise NotImplementedError


def softmax_matmul(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax in fp32 (for any input dtype), then times v."""
    return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


class SdpaBackend(RIBBackend):
    """Mask-free SDPA on the extended q/k/v (a flash kernel on GPU)."""

    name = "sdpa"

    def core(self, q, k, v, f_q, f_k, scale):
        return factored_sdpa(q, k, v, f_q, f_k, scale)


class NaiveBackend(RIBBackend):
    """Explicit scores plus the dense bias ``F_q F_k^T`` (computed once per call)."""

    name = "naive"

    def core(self, q, k, v, f_q, f_k, scale):
        bias = (f_q @ f_k.transpose(-2, -1)) * scale
        return softmax_matmul((q @ k.transpose(-2, -1)) * scale + bias, v)


class ConcatBackend(RIBBackend):
    """One matmul over the factor-extended q and k, then softmax and v."""

    name = "concat"

    def core(self, q, k, v, f_q, f_k, scale):
        return softmax_matmul((extend(q, f_q) @ extend(k, f_k).transpose(-2, -1)) * scale, v)


RIB_BACKENDS: dict[str, type[RIBBackend]] = {cls.name: cls for cls in (SdpaBackend, NaiveBackend, ConcatBackend)}


def make_rib_backend(name: str | RIBBackend, **options) -> RIBBackend:
    """Build a RIB back-end by name (``sdpa``, ``naive``, ``concat``)."""
    if isinstance(name, RIBBackend):
        return name
    key = name.lower()
    if key not in RIB_BACKENDS:
        raise AttentionBackendError(
            f"attention back-end {name!r} does not apply to RIB models (ESC-RIB, SST), whose attention has "
            f"no bias table: choose one of {', '.join(sorted(RIB_BACKENDS))}; 'sdpa' is mask-free and runs "
            f"a flash kernel on GPU.")
    return RIB_BACKENDS[key](**options)
