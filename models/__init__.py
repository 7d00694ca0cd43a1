"""Faithful, export-ready PyTorch ESC models.

>>> from models import load_model
>>> model = load_model("ESC_DIV2K_X4.pth", attention="sdpa")   # recognised, strict, deployed
>>> model.descriptor.scale
4
"""
from .attention import BACKENDS, make_backend
from .base import ESCBase, ModelDescriptor
from .config import VARIANTS, ESCConfig, get_variant
from .errors import AttentionBackendError, CheckpointError, ESCError, UnknownVariantError, WeightsDownloadError
from .hub import OFFICIAL_WEIGHTS
from .loader import create_model, infer_config, load_model, read_state_dict

__all__ = [
    "BACKENDS", "OFFICIAL_WEIGHTS", "VARIANTS", "AttentionBackendError", "CheckpointError", "ESCBase",
    "ESCConfig", "ESCError", "ModelDescriptor", "UnknownVariantError", "WeightsDownloadError",
    "create_model", "get_variant", "infer_config", "load_model", "make_backend", "read_state_dict",
]
