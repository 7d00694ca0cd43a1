"""ESC's window self-attention module (one per block)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelOptionError
from .backends import AttentionBackend, SdpaBackend
from .factored import factorise_bias
from .windows import HEAD_DIM, dense_bias

# Precompute the dense bias only while it stays small: at w=32 and 4 heads it is 16 MB
# per block; esc_xl's w=48 with 12 heads would be 254 MB per block.
DENSE_BIAS_LIMIT_BYTES = 64 * 2**20
#: Share of the bias's squared norm an SVD keeps when no rank is given.
DEFAULT_ENERGY = 0.999


class WindowAttention(nn.Module):
    """``to_qkv`` (1x1) -> window attention with a learned positional bias -> ``to_out`` (1x1).

    The state-dict keys are upstream's: ``to_qkv``, ``to_out`` and the bias, which comes in
    one of two forms:

    - a relative-position table ``relative_position_bias`` (heads, (2w-1)^2), as trained with
      naive/Flex attention (``flashbias_rank`` 0);
    - FlashBias factors ``flashbias_q`` and ``flashbias_k`` (heads, w^2, r), upstream's
      ``attn_type: FlashBias`` (``flashbias_rank`` r): the bias is ``flashbias_q @ flashbias_k^T``
      and never has to exist, so mask-free attention kernels apply as they are.

    The computation between the two convolutions is delegated to an :class:`AttentionBackend`.
    """

    def __init__(self, dim: int, window: int, heads: int, flashbias_rank: int = 0,
                 backend: AttentionBackend | None = None) -> None:
        super().__init__()
        if dim != heads * HEAD_DIM:
            raise ValueError(f"ESC uses head dimension {HEAD_DIM}: dim {dim} != heads {heads} x {HEAD_DIM}")
        if flashbias_rank < 0:
            raise ValueError(f"flashbias_rank must be >= 0 (0: a bias table), got {flashbias_rank}")
        self.window = window
        self.heads = heads
        self.flashbias_rank = flashbias_rank
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if flashbias_rank:
            self.flashbias_q = nn.Parameter(torch.zeros(heads, window * window, flashbias_rank))
            self.flashbias_k = nn.Parameter(torch.zeros(heads, window * window, flashbias_rank))
        else:
            self.relative_position_bias = nn.Parameter(torch.zeros(heads, (2 * window - 1) ** 2))
        self.backend: AttentionBackend = backend or SdpaBackend()
        self.register_buffer("cached_bias", None, persistent=False)
        self.register_buffer("factor_q", None, persistent=False)
        self.register_buffer("factor_k", None, persistent=False)
        self.factor_key: tuple[int | None, float] | None = None
        self.lowrank_report: dict[str, float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_out(self.backend(self.to_qkv(x), self))

    @property
    def has_table(self) -> bool:
        """Whether the bias is a relative-position table (else FlashBias factors are the weights)."""
        return not self.flashbias_rank

    @property
    def bias_form(self) -> str:
        """``"table"`` or ``"flashbias rank R"``: what the weights hold (descriptors, metadata)."""
        return "table" if self.has_table else f"flashbias rank {self.flashbias_rank}"

    def dense_bias(self) -> torch.Tensor:
        """(1, heads, w^2, w^2) bias: the deploy-time cache, else gathered from the table or
        multiplied out of the FlashBias factors."""
        if self.cached_bias is not None:
            return self.cached_bias
        if self.has_table:
            return dense_bias(self.relative_position_bias, self.window)
        return (self.flashbias_q @ self.flashbias_k.transpose(-2, -1)).unsqueeze(0)

    def dense_bias_bytes(self) -> int:
        return self.heads * self.window ** 4 * 4

    @torch.no_grad()
    def precompute_bias(self) -> bool:
        """Deploy-time fold. A table's dense bias is cached (below a size limit); FlashBias
        factors are cached in the scaled form every mask-free back-end consumes."""
        if not self.has_table:
            self.factor_q, self.factor_k = (f.detach().contiguous() for f in self.factors())
            return True
        if self.dense_bias_bytes() > DENSE_BIAS_LIMIT_BYTES:
            return False
        self.cached_bias = dense_bias(self.relative_position_bias.detach(), self.window).contiguous()
        return True

    def drop_bias_cache(self) -> None:
        """Forget the dense bias, e.g. before export, so graphs hold the small table."""
        self.cached_bias = None

    def factors(self, rank: int | None = None, energy: float = DEFAULT_ENERGY) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, heads, w^2, r) q and k factors in the scaled convention of :mod:`.factored`.

        A FlashBias module's factors are its weights (``rank`` must be None or its own). A
        table module factors its dense bias by SVD at ``rank`` (or the smallest rank keeping
        ``energy``), once per (rank, energy), recording the error in :attr:`lowrank_report`:
        the same factors ``export/to_flashbias.py`` writes into a FlashBias checkpoint.
        """
        if not self.has_table:
            if rank not in (None, self.flashbias_rank):
                raise ModelOptionError(
                    f"this FlashBias model's factors are its weights (rank {self.flashbias_rank}); rank {rank} "
                    f"cannot be chosen at run time. Drop the rank option, or convert the Flex-trained "
                    f"checkpoint at that rank (python export/to_flashbias.py --rank {rank}).")
            if self.factor_q is not None:
                return self.factor_q, self.factor_k
            return (self.flashbias_q.unsqueeze(0) * HEAD_DIM ** 0.5, self.flashbias_k.unsqueeze(0))
        key = (rank, energy)
        if self.factor_q is None or self.factor_key != key:
            table_dense = dense_bias(self.relative_position_bias.detach(), self.window)[0]
            f_q, f_k, report = factorise_bias(table_dense, rank, energy)
            self.factor_q = (f_q * HEAD_DIM ** 0.5).unsqueeze(0).contiguous()
            self.factor_k = f_k.unsqueeze(0).contiguous()
            self.factor_key = key
            self.lowrank_report = report.as_dict()
        return self.factor_q, self.factor_k

    def extra_repr(self) -> str:
        form = "" if self.has_table else f", flashbias_rank={self.flashbias_rank}"
        return f"window={self.window}, heads={self.heads}{form}, backend={self.backend!r}"
