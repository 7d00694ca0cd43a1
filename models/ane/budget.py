"""The Neural Engine form's tensor budget: how large one op's result may be, and how to chunk to it.

Why a budget: Apple's own Neural Engine ports keep their big intermediates small by
chunking them ("Deploying Transformers on the Apple Neural Engine", principle 2;
ml-stable-diffusion's SPLIT_EINSUM_V2 splits the queries in chunks of 512 so each score
tensor stays near 4-8 MiB in fp16). ESC's full-window attention at a 256x256 tile would
otherwise make one (1024 keys x 64 windows x 1024 queries) score tensor per head: 128 MiB.
The form therefore chunks every tensor it makes above the budget: attention scores by
windows and queries, the hidden maps of the ConvFFNs and the dynamic 3x3's shifted copies
by channels. Sizes are counted in fp16 (2 bytes), what the Neural Engine holds.
"""
from __future__ import annotations

import math

from ..errors import ModelOptionError

__all__ = ["DEFAULT_BUDGET_BYTES", "FP16_BYTES", "channel_groups", "check_budget", "format_bytes", "spans"]

#: Default largest intermediate, in bytes of fp16 values (8 MiB).
DEFAULT_BUDGET_BYTES = 8 * 2**20
FP16_BYTES = 2


def format_bytes(count: float) -> str:
    """``8.0 MiB`` / ``6.8 KiB``: sizes as the budget messages print them."""
    return f"{count / 2**20:.1f} MiB" if count >= 0.1 * 2**20 else f"{count / 1024:.1f} KiB"


def check_budget(budget: int) -> int:
    """``budget`` as a positive int, or a :class:`ModelOptionError` naming the problem."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < FP16_BYTES:
        raise ModelOptionError(f"the tensor budget must be a number of bytes >= {FP16_BYTES}, got {budget!r} "
                               f"(e.g. 8 * 2**20 for 8 MiB)")
    return budget


def spans(total: int, size: int) -> list[tuple[int, int]]:
    """``[(0, size), (size, 2 size), ...]`` covering ``range(total)``; the last span may be shorter."""
    size = max(1, min(size, total))
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def channel_groups(channels: int, height: int, width: int, budget: int, maps_per_channel: int = 1) -> list[tuple[int, int]]:
    """Channel spans such that one group's (1, span x maps_per_channel, height, width) fp16 tensor fits ``budget``.

    Spans are as even as possible (80 channels in two groups are 40 + 40, not 64 + 16),
    so no group is a sliver. A budget below one channel's maps is refused by name: no
    channel split can meet it, the tile is too large for it.
    """
    per_channel = height * width * FP16_BYTES * maps_per_channel
    if per_channel > budget:
        raise ModelOptionError(
            f"one channel of a {width}x{height} map ({maps_per_channel} map(s)) is {format_bytes(per_channel)} in fp16, "
            f"above the tensor budget of {format_bytes(budget)}: export smaller tiles or raise the budget")
    capacity = budget // per_channel
    groups = math.ceil(channels / capacity)
    return spans(channels, math.ceil(channels / groups))
