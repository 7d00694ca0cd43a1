"""Which Triton the fused kernel needs, checked once with a message that says what to install.

Why a gate: the kernel module reads ``triton.knobs`` (Triton >= 3.4) and the TensorRT
plugin compiles it with ``ASTSource(..., constexprs=...)`` (the 3.4 signature). With an
older Triton those fail deep inside an import as an ``AttributeError``/``TypeError``
that does not name the cause; :func:`require_triton` fails first and names it.
This module imports nothing heavy, so the exporter's environment probe can use it.
"""
from __future__ import annotations

import re

from models.errors import ESCError

#: The oldest Triton the kernel and its AOT compilation run with (``triton.knobs``,
#: ``ASTSource(constexprs=)``). pyproject.toml's ``triton`` floor must match it.
MIN_TRITON = (3, 4)


class TritonVersionError(ESCError, ImportError):
    """The installed Triton is older than :data:`MIN_TRITON`."""


def triton_version_tuple(version: str) -> tuple[int, ...]:
    """``"3.9.0"`` -> ``(3, 9, 0)``; ``"3.4.0+git1234"`` -> ``(3, 4, 0)``."""
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def triton_too_old_message(version: str) -> str | None:
    """The gate's message for ``version``, or None when it is new enough."""
    if triton_version_tuple(version) >= MIN_TRITON:
        return None
    floor = ".".join(map(str, MIN_TRITON))
    return (f"Triton {version} is too old for the fused window-attention kernel: it needs triton >= {floor} "
            f"(triton.knobs and ASTSource(constexprs=) arrived in {floor}). Upgrade with "
            f"pip install -U 'triton>={floor}' (or a torch build that ships it), or use another attention "
            f"back-end (sdpa)")


def require_triton(version: str) -> None:
    """Raise :class:`TritonVersionError` when ``version`` is older than :data:`MIN_TRITON`."""
    message = triton_too_old_message(version)
    if message:
        raise TritonVersionError(message)
