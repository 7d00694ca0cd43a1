"""models.hub downloads: only a complete, loadable checkpoint ever reaches the cache.

A local HTTP server plays the release host: a good file, a body cut short of its
Content-Length, a complete response that is not a checkpoint (a truncated file served
whole), a 404, and a port nobody listens on.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from models import hub
from models.errors import WeightsDownloadError

NAME = "ESC_light_X4"


def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"params": {"conv.weight": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}}, buffer)
    return buffer.getvalue()


GOOD = checkpoint_bytes()


class ReleaseHost(BaseHTTPRequestHandler):
    """``/good/``, ``/short/``, ``/truncated/`` serve NAME.pth; anything else is 404."""

    def do_GET(self) -> None:
        kind = self.path.strip("/").split("/")[0]
        if kind not in ("good", "short", "truncated"):
            self.send_error(404, "Not Found")
            return
        body = GOOD if kind == "good" else GOOD[: len(GOOD) // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(GOOD) if kind == "short" else len(body)))
        self.end_headers()
        self.wfile.write(body)  # "short": the connection closes with bytes still owed
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        """Keep the test output clean."""


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHost)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cached_files(cache: Path) -> list[str]:
    """Every entry of the cache, hidden partial files included."""
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_complete_download_is_cached_and_loads(server: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESC_WEIGHTS_URL", f"{server}/good")
    path = hub.resolve(f"official:{NAME}", progress=False)
    assert path == cache / f"{NAME}.pth" and cached_files(cache) == [f"{NAME}.pth"]
    loaded = torch.load(path, weights_only=True)
    assert loaded["params"]["conv.weight"].shape == (64, 64)


@pytest.mark.parametrize(("kind", "message"), [
    ("short", r"(stopped after \d+ of \d+ bytes|IncompleteRead)"),
    ("truncated", "did not download as a readable weights-only checkpoint"),
    ("missing", "HTTP Error 404"),
])
def test_a_failed_download_leaves_nothing_in_the_cache(kind: str, message: str, server: str, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESC_WEIGHTS_URL", f"{server}/{kind}")
    with pytest.raises(WeightsDownloadError, match=message):
        hub.resolve(f"official:{NAME}", progress=False)
    assert cached_files(cache) == []


def test_a_refused_connection_leaves_nothing_in_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("ESC_WEIGHTS_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsDownloadError, match="could not download .*refused.*--weights /path/to/"):
        hub.resolve(f"official:{NAME}", progress=False)
    assert cached_files(cache) == []
