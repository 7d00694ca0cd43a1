"""The RIB family (ESC-RIB, SST): window attention whose positional bias is two low-rank
factors concatenated to q and k, so attention needs no mask and flash kernels apply.

Only the config is imported here: :mod:`models.config` needs it while :mod:`models.base`
(which the networks build on) is still importing. The networks live in
:mod:`models.rib.esc_rib` and :mod:`models.rib.sst`; ``models`` re-exports the public names.
"""
from .config import RIBConfig

__all__ = ["RIBConfig"]
