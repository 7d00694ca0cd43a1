"""Command-line pieces every ESC command shares: one size syntax and one set of runner flags.

Sizes are written ``WIDTHxHEIGHT`` everywhere a person types one (``1280x720``, as the
papers and video tools write it) and parsed only by :func:`parse_size`, which returns
``(height, width)``: the order of a tensor's last two axes, so code never swaps them.
``runtimes.upscale`` and ``validation/parity.py`` run an artifact through
:func:`runtimes.load` with the same flags; :func:`add_runner_args` declares them once and
:func:`runner_options` turns them into ``load`` keywords.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

__all__ = ["SIZE_SYNTAX", "SizeSyntaxError", "add_runner_args", "format_size", "non_negative_int", "parse_size",
           "positive_int", "runner_options"]

#: How a size is written, for ``--help`` texts and error messages.
SIZE_SYNTAX = "WIDTHxHEIGHT, e.g. 1280x720"

#: Runner flags passed to :func:`runtimes.load` only when given: a runner refuses by name
#: an option it cannot use, so an unset flag must not reach it.
_LOAD_OPTIONS = ("provider", "precision", "attention", "threads", "variant")


class SizeSyntaxError(argparse.ArgumentTypeError, ValueError):
    """A size that is not ``WIDTHxHEIGHT``: argparse prints it as a usage error, callers may catch ValueError."""


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` (WIDTHxHEIGHT) -> ``(720, 1280)`` (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise SizeSyntaxError(f"size must be {SIZE_SYNTAX} (width first); got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1:
        raise SizeSyntaxError(f"size {text!r} must be at least 1x1 ({SIZE_SYNTAX})")
    return height, width


def format_size(height: int, width: int) -> str:
    """``(720, 1280)`` -> ``"1280x720"``: the inverse of :func:`parse_size`."""
    return f"{width}x{height}"


def _integer(text: str, minimum: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(text, 0, "an integer >= 0")


def add_runner_args(parser: argparse.ArgumentParser, artifact_help: str) -> None:
    """Declare the flags that choose and configure the runner of ``--artifact``."""
    group = parser.add_argument_group("runner (the same flags in upscale and parity)")
    group.add_argument("--artifact", required=True, help=artifact_help)
    group.add_argument("--device", default="cpu", help="device the artifact runs on: cpu or cuda[:N] (default cpu)")
    group.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default=None,
                       help="ONNX Runtime execution provider for an .onnx artifact (default: from --device)")
    group.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                       help="precision of a checkpoint artifact's PyTorch runner (fp16 needs CUDA); "
                            "exported files carry their own")
    group.add_argument("--attention", default=None,
                       help="attention back-end of a checkpoint artifact's PyTorch runner (default sdpa)")
    group.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the artifact's runtime")
    group.add_argument("--variant", default=None,
                       help="variant of a checkpoint artifact when its weights cannot say (e.g. sst_plus vs sst: "
                            "window sizes are not in the weights); default: recognised from the keys and file name")
    group.add_argument("--tile", type=positive_int, default=None,
                       help="model input size per call (default: chosen from the memory budget; "
                            "fixed-shape artifacts use their own)")
    group.add_argument("--overlap", type=non_negative_int, default=None,
                       help="context pixels around each tile (default: the model's context, 96 for ESC, "
                            "chosen with the tile)")
    group.add_argument("--batch-size", type=positive_int, default=None,
                       help="tiles per model call (default: as many as the memory budget holds, at most 4)")


def runner_options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The :func:`runtimes.load` keywords of the runner flags (and ``extra``) that were given."""
    given = {name: getattr(args, name) for name in _LOAD_OPTIONS} | extra
    return {name: value for name, value in given.items() if value is not None}
