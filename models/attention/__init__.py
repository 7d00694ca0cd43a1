"""Window self-attention and its interchangeable back-ends."""
from .backends import BACKENDS, AttentionBackend, CoreMLBackend, make_backend
from .module import WindowAttention

__all__ = ["BACKENDS", "AttentionBackend", "CoreMLBackend", "WindowAttention", "make_backend"]
