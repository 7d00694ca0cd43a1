"""ESC's ConvFFN in the Neural Engine form: the hidden channels in groups that fit the tensor budget.

ConvFFN is ``aggr(gelu(dwc(g)) + g)`` with ``g = gelu(proj(x))``. Everything up to
``aggr`` acts on each hidden channel alone (1x1 rows, a depthwise 3x3, GELU), and
``aggr`` is a sum over hidden channels, so the hidden map can be computed a group of
channels at a time and ``aggr``'s partial sums added (its bias once). At a 256x256 tile
the 128 hidden channels of ESC's ``proj`` FFN would be one 16 MiB fp16 map; in groups of
64 each is 8 MiB. Below the budget nothing changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvFFN
from .budget import channel_groups

__all__ = ["AneConvFFN", "use_chunked_ffns"]


class AneConvFFN(ConvFFN):
    """:class:`ConvFFN` with its hidden channels in budget-sized groups (a class switch)."""

    ane_budget: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj.out_channels
        groups = channel_groups(hidden, int(x.shape[-2]), int(x.shape[-1]), self.ane_budget)
        if len(groups) == 1:
            return super().forward(x)
        out = None
        for lo, hi in groups:
            g = F.gelu(F.conv2d(x, self.proj.weight[lo:hi], self.proj.bias[lo:hi]))
            t = F.gelu(F.conv2d(g, self.dwc.weight[lo:hi], self.dwc.bias[lo:hi], padding=1, groups=hi - lo)) + g
            part = F.conv2d(t, self.aggr.weight[:, lo:hi], self.aggr.bias if out is None else None)
            out = part if out is None else out + part
        return out


def use_chunked_ffns(model: nn.Module, budget: int) -> int:
    """Switch every ConvFFN of ``model`` (in place) to :class:`AneConvFFN`; returns how many."""
    switched = 0
    for module in model.modules():
        if type(module) is ConvFFN:
            module.__class__ = AneConvFFN
            module.ane_budget = budget
            switched += 1
    return switched
