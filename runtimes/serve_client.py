"""Upscale files or a folder through a running ESC Triton server (``python -m runtimes.serve``).

    python -m runtimes.serve_client INPUT OUTPUT [--url http://127.0.0.1:8000 | grpc://127.0.0.1:8001]
        [--concurrency 4 --tile T --overlap O --batch-size B --quiet]

The server is just another runner: :class:`TritonRunner` implements ``Runner._infer`` by
sending the batch as input ``lr`` and returning output ``sr``, so tiling, alpha planes,
grey and 16-bit images and every file rule (outputs never overwrite inputs, a bad file is
named and skipped, exit 0/1/2) are exactly those of ``runtimes.upscale``, whose
``upscale_file`` and input planning this module calls.  ``--concurrency`` files are in
flight at once, each thread with its own connection (tritonclient's clients are not
thread-safe); the server batches the equal-size requests that arrive together.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch
from tqdm import tqdm

from models.errors import ESCError
from runtimes import imageio
from runtimes.base import Runner, RunnerError
from runtimes.cli_args import non_negative_int, positive_int
from runtimes.serve import INPUT, MODEL_NAME, OUTPUT
from runtimes.upscale import UsageError, plan_outputs, upscale_file

__all__ = ["TritonRunner", "main", "read_metric", "server_message"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Side of the blank image sent once to learn the server's upscaling factor.
_PROBE_SIDE = 8


def server_message(exc: Exception) -> str:
    """The line of a Triton error that names the problem.

    Errors raised inside the PyTriton model arrive with the server-side traceback; its
    last non-blank line (``RequestError: input 'lr' is ...``) is what a person needs.
    """
    text = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip() and not line.strip().startswith("At:")]
    lines = [line for line in lines if not line.startswith("/")]  # the stub's "At: <file>(line)" trailer
    return lines[-1] if lines else type(exc).__name__


def read_metric(metrics_url: str, name: str, model: str = MODEL_NAME) -> float:
    """One counter of ``model`` from a server's Prometheus endpoint (``http://HOST:PORT/metrics``).

    Why the metrics port: PyTriton restricts Triton's statistics API to callers holding its
    access token, while ``nv_inference_count`` / ``nv_inference_exec_count`` are public and
    their ratio is the mean batch size the dynamic batcher formed.
    """
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf'^{re.escape(name)}{{[^}}]*model="{re.escape(model)}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    if match is None:
        raise RunnerError(f"{metrics_url} reports no {name} for model {model!r}")
    return float(match.group(1))


class TritonRunner(Runner):
    """A Runner whose model is the ``esc`` model of a Triton server.

    ``url``: ``http://HOST:PORT`` or ``grpc://HOST:PORT`` (a bare ``HOST:PORT`` is HTTP).
    The scale is read from the server once, by upscaling a blank 8x8 image.
    """

    name = "triton"

    def __init__(self, url: str = DEFAULT_URL, model: str = MODEL_NAME, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "grpc") or not parts.hostname or not parts.port:
            raise RunnerError(f"--url must be http://HOST:PORT or grpc://HOST:PORT, got {url!r}")
        try:
            import tritonclient.grpc  # noqa: F401
            import tritonclient.http  # noqa: F401
        except ImportError as exc:
            raise RunnerError(f"the client needs tritonclient ({exc}); pip install 'esc-deploy[serve]'") from exc
        self.protocol, self.address, self.model = parts.scheme, f"{parts.hostname}:{parts.port}", model
        self.artifact = f"{self.protocol}://{self.address}/{model}"
        self.device, self.precision, self.input_multiple, self.fixed_shape = "server", "fp32", 1, None
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._wait_ready(timeout_s)
        probe = self._send(np.zeros((1, 3, _PROBE_SIDE, _PROBE_SIDE), np.float32))
        self.scale = probe.shape[-1] // _PROBE_SIDE

    @property
    def _module(self) -> Any:
        import tritonclient.grpc
        import tritonclient.http

        return tritonclient.grpc if self.protocol == "grpc" else tritonclient.http

    def _client(self) -> Any:
        """This thread's connection (created on first use)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._module.InferenceServerClient(self.address)
            with self._lock:
                self._clients.append(client)
        return client

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._client().is_model_ready(self.model):
                    return
                problem = f"the server answers but model {self.model!r} is not ready"
            except Exception as exc:  # connection refused, DNS, protocol mismatch: all mean "no server here"
                problem = f"no Triton server answers ({type(exc).__name__}: {server_message(exc)})"
            if time.monotonic() > deadline:
                raise RunnerError(f"{self.artifact}: {problem} after {timeout_s:.0f}s; start one with "
                                  f"python -m runtimes.serve ARTIFACT")
            time.sleep(0.2)

    def _send(self, lr: np.ndarray) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        request = self._module.InferInput(INPUT, list(lr.shape), "FP32")
        request.set_data_from_numpy(lr)
        try:
            result = self._client().infer(self.model, [request],
                                          outputs=[self._module.InferRequestedOutput(OUTPUT)])
        except InferenceServerException as exc:
            raise RunnerError(f"{self.artifact} refused a {lr.shape[2]}x{lr.shape[3]} request: "
                              f"{server_message(exc)}") from None
        return result.as_numpy(OUTPUT)

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        lr = np.ascontiguousarray(batch.detach().float().cpu().numpy())
        return torch.from_numpy(self._send(lr).copy()).to(batch.device)

    def runtime_details(self) -> dict[str, Any]:
        return {"runtime": f"triton ({self.protocol})", "url": f"{self.protocol}://{self.address}",
                "model": self.model}

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.serve_client",
        description="Upscale an image or a directory of images through a running ESC Triton server "
                    "(python -m runtimes.serve), over HTTP or gRPC; same file handling as runtimes.upscale.",
        epilog="examples:\n"
               "  python -m runtimes.serve_client photo.png photo_x4.png\n"
               "  python -m runtimes.serve_client photos/ upscaled/ --url grpc://127.0.0.1:8001 --concurrency 8\n"
               "exit status: 0 all files written, 1 some files failed or were skipped, 2 usage error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="image file or directory of images")
    parser.add_argument("output", type=Path, help="output file, or directory (created if missing)")
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"server: http://HOST:PORT or grpc://HOST:PORT (default {DEFAULT_URL})")
    parser.add_argument("--model", default=MODEL_NAME,
                        help=f"model to send to (default {MODEL_NAME}; NAME_tiled for a fixed-shape repository)")
    parser.add_argument("--concurrency", type=positive_int, default=4, help="files in flight at once (default 4)")
    parser.add_argument("--tile", type=positive_int, default=None,
                        help="input size per request (default: whole image; needed above the server's --max-side)")
    parser.add_argument("--overlap", type=non_negative_int, default=16, help="context pixels around each tile")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="tiles per request (default 4)")
    parser.add_argument("--timeout", type=positive_int, default=10, help="seconds to wait for the server")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pairs = plan_outputs(args)
        runner = TritonRunner(args.url, model=args.model, timeout_s=args.timeout)
    except (UsageError, ESCError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    inputs = [src for src, _ in pairs]
    failed: list[str] = []
    start = time.perf_counter()

    def one(src: Path, dst: Path) -> Path:
        return upscale_file(runner, src, dst, args.tile, args.overlap, args.batch_size, protect=inputs)

    with runner, ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        futures = {pool.submit(one, src, dst): src for src, dst in pairs}
        bar = tqdm(as_completed(futures), total=len(futures), desc="images", unit="img",
                   disable=args.quiet, file=sys.stderr)
        for future in bar:
            src = futures[future]
            try:
                future.result()
            except imageio.ImageReadError as exc:
                failed.append(str(src))
                tqdm.write(f"skipped {exc}", file=sys.stderr)
            except (ESCError, ValueError, OSError) as exc:  # one bad file must not stop the others
                failed.append(str(src))
                tqdm.write(f"failed {src}: {exc}", file=sys.stderr)
        bar.close()
        info = runner.describe()

    elapsed = time.perf_counter() - start
    done = len(pairs) - len(failed)
    print(f"server: {info['url']} model {info['model']} (x{info['scale']})")
    print(f"upscaled {done} file(s), {len(failed)} failed or skipped, in {elapsed:.1f}s "
          f"({done / elapsed if elapsed > 0 else 0:.2f} images/s)")
    if failed:
        print("failed: " + ", ".join(sorted(failed)), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
