"""Helpers every exporter shares (ONNX now, TensorRT and Core ML too).

- :func:`atomic_output`: write a file *or a directory* (``.mlpackage``) under a temporary
  name in the destination folder and move it into place only on success.
- :func:`sha256_file`, :func:`human_size`; :func:`toolkit_version` is re-exported from
  :mod:`runtimes.metadata`, which owns it with the rest of the artifact metadata schema.
- :func:`print_summary`: the one-screen box every exporter ends with.
- :func:`resolve_weights_arg` and :func:`add_common_args`: the shared
  ``--model/--scale/--weights/-o`` handling.
- :func:`run_cli`: runs a ``main()`` and turns user errors (:class:`models.errors.ESCError`,
  ``ValueError`` from argument validation) into ``error: <message>`` on stderr and exit
  status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from runtimes.metadata import toolkit_version

if TYPE_CHECKING:  # pragma: no cover
    from models import ESCBase

__all__ = ["atomic_output", "sha256_file", "toolkit_version", "human_size", "path_size", "format_summary",
           "print_summary", "add_common_args", "resolve_weights_arg", "run_cli"]

EXIT_USER_ERROR = 2


# -- files ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; move it into place on success.

    The temporary path lives in a private folder inside ``path``'s parent (same file
    system, so the final move is an atomic ``os.replace``) and has ``path``'s own name, so
    writers that derive side files from it (ONNX external data ``model.onnx.data``) put
    them beside it: every entry of that folder is moved next to ``path``, side files
    first, ``path`` last. Works for files and for directories (``.mlpackage``); an
    existing destination is replaced. On any exception nothing is moved and the
    temporary folder is removed, so a failed export leaves no partial artifact.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp = tmp_root / final.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {final} (expected {tmp})")
        for entry in sorted(tmp_root.iterdir()):
            if entry.name != final.name:
                _replace(entry, final.parent / entry.name, tmp_root)
        _replace(tmp, final, tmp_root)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _replace(src: Path, dst: Path, scratch: Path) -> None:
    """``os.replace`` that also replaces an existing directory, atomically where the OS can.

    A file is one ``os.replace``. A directory cannot be renamed onto a non-empty one, so
    under a lock on the destination folder (two exports racing for one ``.mlpackage``
    take turns, the later one wins) the new directory is *exchanged* with the old one
    (Linux ``renameat2(RENAME_EXCHANGE)``: readers never see the path missing) and the
    old one, now at the scratch name, is deleted. Where exchange is unavailable the old
    directory is moved aside first (a moment without the path, still never half-written).
    """
    if not src.is_dir():
        os.replace(src, dst)
        return
    with _folder_lock(dst.parent):
        if not (dst.is_dir() and not dst.is_symlink()):
            os.replace(src, dst)
        elif _exchange(src, dst):
            shutil.rmtree(src, ignore_errors=True)  # src now holds the old directory
        else:
            aside = scratch / f".old-{dst.name}"
            os.replace(dst, aside)
            os.replace(src, dst)
            shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself (no lock file left behind); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the exchange below is not available there either
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no glibc, or glibc older than 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def path_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a directory."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def human_size(n: int | float) -> str:
    """``1536`` -> ``'1.5 KiB'``; bytes below 1 KiB are shown exactly."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


# -- summary ------------------------------------------------------------------------------
def format_summary(title: str, rows: Sequence[tuple[str, str]], width: int | None = None,
                   unicode: bool | None = None) -> str:
    """The box :func:`print_summary` prints, as a string.

    Values wrap at the terminal width and ``\\n`` splits them, except rows whose key
    starts with ``use``: those hold a command to copy and are never wrapped (the box
    widens instead).
    """
    if width is None:
        width = min(max(shutil.get_terminal_size((100, 24)).columns, 60), 120)
    if unicode is None:
        unicode = _can_encode("─│┌┐└┘├┤")
    h, v, tl, tr, bl, br = ("─", "│", "┌", "┐", "└", "┘") if unicode else ("-", "|", "+", "+", "+", "+")
    key_w = min(max((len(k) for k, _ in rows), default=0), 22)
    inner = width - 4                      # "│ " + content + " │"
    val_w = max(inner - key_w - 2, 20)
    lines: list[str] = []
    for key, value in rows:
        chunks: list[str] = []
        for part in str(value).split("\n") or [""]:
            if key.startswith("use"):
                chunks.append(part)
            else:
                chunks += textwrap.wrap(part, val_w, break_long_words=True, break_on_hyphens=False) or [""]
        for i, chunk in enumerate(chunks):
            label = key if i == 0 else ""
            lines.append(f"{label:<{key_w}}  {chunk}")
    content_w = max([len(line) for line in lines] + [len(title) + 2])
    head = f"{tl}{h} {title} {h * max(content_w - len(title) - 1, 1)}{tr}"
    body = [f"{v} {line:<{content_w}} {v}" for line in lines]
    foot = f"{bl}{h * (content_w + 2)}{br}"
    return "\n".join([head, *body, foot])


def print_summary(title: str, rows: Sequence[tuple[str, str]], file=None) -> None:
    """Print a one-screen box: ``title`` on top, then ``key  value`` rows."""
    out = file or sys.stdout
    print(format_summary(title, rows, unicode=_can_encode("─│┌┐└┘", out)), file=out, flush=True)


def _can_encode(chars: str, stream=None) -> bool:
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        chars.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


# -- model and weights arguments -----------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, default_model: str | None = None,
                    output_help: str = "output path (default: derived from the model under artifacts/)") -> None:
    """``--model``, ``--scale``, ``--weights`` and ``-o/--output``, the same for every exporter."""
    parser.add_argument("--model", default=default_model,
                        help="variant: esc, esc_light, esc_fp, esc_real, esc_xl (default: recognised from --weights)")
    parser.add_argument("--scale", type=int, default=None,
                        help="upscaling factor (default: from --weights; 4 for random weights)")
    parser.add_argument("--weights", default=None,
                        help="checkpoint (.pth/.safetensors) or official:NAME, e.g. official:ESC_DIV2K_X4 "
                             "(default: random weights, for latency/export checks only)")
    parser.add_argument("-o", "--output", type=Path, default=None, help=output_help)


def resolve_weights_arg(model_name: str | None, scale: int | None, weights: str | os.PathLike | None,
                        attention: str = "sdpa", deploy: bool = True,
                        **attention_options) -> tuple["ESCBase", str | None]:
    """Build the model the command line asks for; returns ``(model, weights_sha256 or None)``.

    - ``weights`` given: loaded strictly by :func:`models.load_model` (``official:NAME``
      downloads once); ``model_name`` and ``scale``, when given, must match what the
      weights are (a :class:`models.errors.CheckpointError` explains a mismatch).
    - no weights: ``model_name`` is required; the variant gets random weights (a
      warning says so loudly) at ``scale`` (default 4, or the variant's only scale).
    The SHA-256 is that of the checkpoint file actually read (None for random weights).
    """
    import models
    from models import hub

    if weights is not None:
        spec = str(weights)
        path = hub.resolve(spec) if hub.is_official(spec) else Path(spec)
        model = models.load_model(path, attention=attention, deploy=deploy, scale=scale, variant=model_name or None,
                                  **attention_options)
        return model, sha256_file(path)
    if not model_name:
        raise ValueError("pass --model NAME (random weights) or --weights PATH|official:NAME")
    variant = models.get_variant(model_name)
    if scale is None:
        scale = 4 if 4 in variant.scales else variant.scales[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # replaced by the louder notice below
        model = models.create_model(variant.name, scale, attention=attention, deploy=deploy, **attention_options)
    print(f"WARNING: no --weights given: {variant.name} x{scale} has RANDOM weights. Its output is "
          f"meaningless; use it for latency and export checks only.", file=sys.stderr, flush=True)
    return model, None


# -- CLI wrapper ------------------------------------------------------------------------------
def run_cli(main: Callable[..., int | None], argv: Sequence[str] | None = None) -> None:
    """Run ``main`` and exit with its status; user errors exit 2 with one ``error:`` line.

    Caught: :class:`models.errors.ESCError` (bad checkpoint, unknown variant, export
    problems the exporters raise as ESCError subclasses) and ``ValueError`` (argument
    validation). ``OSError`` (disk full, permission) exits 1 with its message. Anything
    else is a bug and keeps its traceback.
    """
    from models.errors import ESCError

    try:
        status = main() if argv is None else main(list(argv))
    except (ESCError, ValueError) as exc:
        _print_error(exc)
        sys.exit(EXIT_USER_ERROR)
    except OSError as exc:
        _print_error(exc)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))


def _print_error(exc: BaseException) -> None:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
