"""ESC-FP (the fast, decomposed-kernel variant)."""
from .arch import ESCFP

__all__ = ["ESCFP"]
