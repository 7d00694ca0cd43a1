"""ESC-Real (real-world super-resolution, x4)."""
from .arch import ESCReal

__all__ = ["ESCReal"]
