"""Window self-attention and its interchangeable back-ends."""
from .backends import BACKENDS, AttentionBackend, make_backend
from .module import WindowAttention

__all__ = ["BACKENDS", "AttentionBackend", "WindowAttention", "make_backend"]
