"""ESC, ESC-light and ESC-XL (one architecture, three sizes)."""
from .arch import ESC

__all__ = ["ESC"]
