"""Official ESC weights by name: ``official:ESC_DIV2K_X4`` and friends.

Names are the file names of upstream's test configs; they resolve to the release assets
of ``dslisleedh/ESC`` tag 1.0.0, downloaded once into a cache directory. Set
``ESC_WEIGHTS_URL`` to use a mirror and ``ESC_CACHE_DIR`` to move the cache.

A download takes its cache name only after two checks: the byte count equals the
server's ``Content-Length`` (an interrupted transfer is short), and the file loads with
``torch.load(weights_only=True)`` (a truncated or wrong file does not). Anything that
fails either check is deleted, so the cache never holds a partial checkpoint that a later
run would trust.
"""
from __future__ import annotations

import http.client
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .errors import WeightsDownloadError

RELEASE_URL = "https://github.com/dslisleedh/ESC/releases/download/1.0.0"
PREFIX = "official:"

# name -> variant it holds (the loader still recognises the variant from the keys).
OFFICIAL_WEIGHTS: dict[str, str] = {
    **{f"ESC_DIV2K_X{s}": "esc" for s in (2, 3, 4)},
    **{f"ESC_light_X{s}": "esc_light" for s in (2, 3, 4)},
    **{f"ESC_FP_X{s}": "esc_fp" for s in (2, 3, 4)},
    "ESC_Real_X4_GAN": "esc_real",
    **{f"ESC_DFLIP_X{s}": "esc" for s in (2, 3, 4)},
    **{f"ESC_XL_DF2K_X{s}_FT": "esc_xl" for s in (2, 3, 4)},
}


def is_official(spec: str | os.PathLike) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def cache_dir() -> Path:
    root = os.environ.get("ESC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "esc-deploy"
    return Path(root)


def weights_url(name: str) -> str:
    base = os.environ.get("ESC_WEIGHTS_URL", RELEASE_URL).rstrip("/")
    return f"{base}/{name}.pth"


def resolve(spec: str, progress: bool = True) -> Path:
    """Path of the cached file for ``official:NAME``, downloading it on first use."""
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if name not in OFFICIAL_WEIGHTS:
        import difflib

        close = difflib.get_close_matches(name, OFFICIAL_WEIGHTS, n=1)
        hint = f" Did you mean official:{close[0]}?" if close else ""
        raise WeightsDownloadError(
            f"no official ESC weights are named {name!r}.{hint} Known names: "
            f"{', '.join(sorted(OFFICIAL_WEIGHTS))}.")
    target = cache_dir() / f"{name}.pth"
    if not target.exists():
        download(weights_url(name), target, progress=progress)
    return target


def download(url: str, target: Path, progress: bool = True, timeout: float = 30.0) -> None:
    """Stream ``url`` to ``target`` atomically; only a complete, loadable checkpoint takes its name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            written = _copy_with_progress(response, out, total, target.name, progress)
        if total is not None and written != total:
            raise WeightsDownloadError(
                f"the download of {url} stopped after {written} of {total} bytes (connection dropped?). "
                f"Nothing was cached; run the command again to retry")
        _check_loadable(Path(tmp_name), url)
        os.replace(tmp_name, target)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as exc:
        Path(tmp_name).unlink(missing_ok=True)
        raise WeightsDownloadError(
            f"could not download {url} ({exc}). If this machine is offline, download that file "
            f"elsewhere and pass its path instead (--weights /path/to/{target.name}), or place it at "
            f"{target}; ESC_WEIGHTS_URL points the toolkit at a mirror.") from exc
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _check_loadable(path: Path, url: str) -> None:
    """Refuse a file ``torch.load(weights_only=True)`` cannot read: truncated, or not a checkpoint."""
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as exc:
        raise WeightsDownloadError(
            f"{url} did not download as a readable weights-only checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). Nothing was cached; check "
            f"ESC_WEIGHTS_URL points at the release assets and retry") from None


def _copy_with_progress(src, dst, total: int | None, label: str, progress: bool) -> int:
    """Copy ``src`` to ``dst`` in 1 MiB chunks with a progress bar; returns the bytes copied."""
    from tqdm import tqdm

    written = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {label}",
              disable=not progress, leave=False) as bar:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written


def clear_cache() -> None:
    shutil.rmtree(cache_dir(), ignore_errors=True)
