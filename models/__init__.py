"""Faithful, export-ready PyTorch ESC models and their RIB successors (ESC-RIB, SST).

>>> from models import load_model
>>> model = load_model("ESC_DIV2K_X4.pth", attention="sdpa")   # recognised, strict, deployed
>>> model.descriptor.scale
4
"""
from .attention import BACKENDS, make_backend
from .base import ESCBase, ModelDescriptor
from .config import VARIANTS, ESCConfig, get_variant
from .errors import (
    AttentionBackendError,
    CheckpointError,
    ESCError,
    ModelOptionError,
    UnknownVariantError,
    WeightsDownloadError,
)
from .hub import OFFICIAL_WEIGHTS
from .loader import create_model, infer_config, load_model, read_state_dict
from .rib.backends import RIB_BACKENDS
from .rib.config import RIBConfig
from .rib.esc_rib import ESCRIB
from .rib.network import RIBDescriptor, RIBNetwork
from .rib.sst import SST

__all__ = [
    "BACKENDS", "ESCRIB", "OFFICIAL_WEIGHTS", "RIB_BACKENDS", "SST", "VARIANTS", "AttentionBackendError",
    "CheckpointError", "ESCBase", "ESCConfig", "ESCError", "ModelDescriptor", "ModelOptionError", "RIBConfig", "RIBDescriptor",
    "RIBNetwork", "UnknownVariantError", "WeightsDownloadError",
    "create_model", "get_variant", "infer_config", "load_model", "make_backend", "read_state_dict",
]
