"""RIB's positional factors: a tiny MLP over window coordinates, one q and one k factor.

They depend on the window size and the weights only, never on the input, which is why
a deployed model computes them once (:meth:`RIBAttention.precompute_bias`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_features(window: int, n_freqs: int, device: torch.device | None = None) -> torch.Tensor:
    """(window^2, 2 + 4 n_freqs) Fourier features of the token centres, raster order.

    Token (row i, column j) sits at u = 2 (j + 0.5) / w - 1, v = 2 (i + 0.5) / w - 1; its
    features are [u, v] then, for f = 1, 2, 4, ..., [sin fu, sin fv, cos fu, cos fv]
    (upstream's order; computed in fp32 as upstream does).
    """
    centres = 2.0 * (torch.arange(window, dtype=torch.float32, device=device) + 0.5) / window - 1.0
    u = centres[None, :].expand(window, window)
    v = centres[:, None].expand(window, window)
    base = torch.stack([u, v], dim=-1).reshape(window * window, 2)
    parts = [base]
    for i in range(n_freqs):
        parts += [torch.sin(base * 2 ** i), torch.cos(base * 2 ** i)]
    return torch.cat(parts, dim=-1)


def positional_factors(features: torch.Tensor, to_hidden: torch.Tensor, hidden_b: torch.Tensor,
                       to_q: torch.Tensor, to_k: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k factors (1, heads, N, r) whose product, scaled like q k^T, is the bias.

    Upstream adds ``P_q P_k^T / sqrt(r)`` to ``q k^T / sqrt(d)``. Every back-end here
    scales the whole (q | factor) product by ``1 / sqrt(d)``, so the q factor carries
    ``sqrt(d / r)``: ``[q, P_q sqrt(d/r)] . [k, P_k] / sqrt(d)`` is exactly upstream's score.
    """
    hidden = F.relu(features.float() @ to_hidden.float() + hidden_b.float())
    rank = to_q.shape[-1]
    p_q = torch.einsum("nd,hdr->hnr", hidden, to_q.float()) * (head_dim / rank) ** 0.5
    p_k = torch.einsum("nd,hdr->hnr", hidden, to_k.float())
    return p_q.unsqueeze(0), p_k.unsqueeze(0)
