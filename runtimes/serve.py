"""Serve an ESC artifact on a real Triton Inference Server, through PyTriton.

    python -m runtimes.serve ARTIFACT [--http-port 8000 --grpc-port 8001 --metrics-port 8002
        --max-batch 8 --max-delay-us 2000 --max-side 1024 --threads N]

ARTIFACT is anything :func:`runtimes.base.load` runs (``model.onnx`` through ONNX Runtime,
``openvino:model.onnx`` through OpenVINO, a checkpoint through PyTorch, an engine through
TensorRT).  PyTriton starts the ``tritonserver`` it bundles on 127.0.0.1 and forwards every
batch Triton forms to that runner in this process, so the numbers a client gets are the
runner's own.

The model is ``esc``: input ``lr`` FP32 ``N x 3 x H x W`` in [0, 1], output ``sr`` FP32
``N x 3 x sH x sW``.  Triton's dynamic batcher merges queued requests of *equal* size
(inputs with variable dims are only batched when their shapes match) up to ``--max-batch``
images, waiting at most ``--max-delay-us`` for company; ``--max-batch 1`` turns batching off.

Bad requests never take the server down.  Triton itself refuses a wrong dtype, rank or
channel count against the declared input, and an empty batch (byte size mismatch); an
image with zero height or width is refused by PyTriton's shared-memory layer before it
reaches this process ("memoryview: cannot cast view with zeros in shape"); oversized images
are refused here (:func:`check_request`) with a :class:`RequestError` whose message names
the problem and the fix.  Any of these fails only the execution it belongs to (Triton
batches only equal shapes, so a bad shape never shares an execution with a good one); the
next request is served normally.

Why LD_LIBRARY_PATH is set (:func:`stub_library_path`): the Python-backend stub PyTriton
ships for this Python version links ``libpython3.X.so.1.0`` and, without help, the loader
finds the system's copy, whose C layer does not match this interpreter's standard library
(model initialisation then fails inside ``threading``).  Putting the running interpreter's
own library folder first makes the stub load the matching libpython.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.errors import ESCError
from runtimes.base import Runner, load
from runtimes.cli_args import non_negative_int, positive_int

__all__ = ["INPUT", "MODEL_NAME", "OUTPUT", "RequestError", "ServeOptions", "ServerProcess", "check_request",
           "free_ports", "main", "make_infer_fn", "serve", "stub_library_path"]

MODEL_NAME = "esc"
INPUT = "lr"
OUTPUT = "sr"
#: Sides above this are refused by default: one 1024 x 1024 image upscaled x4 is already 200 MB
#: of float32 output, and ONNX Runtime's attention scores need several times that.
DEFAULT_MAX_SIDE = 1024

#: Printed once the model is loaded and the endpoints answer.
READY_LINE = "ready; Ctrl-C or SIGTERM stops the server"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class RequestError(ValueError):
    """A request the model cannot run: its message goes back to the client as the error."""


@dataclass(frozen=True)
class ServeOptions:
    """Where and how to serve (the command-line flags)."""

    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8
    max_delay_us: int = 2000
    max_side: int = DEFAULT_MAX_SIDE
    host: str = "127.0.0.1"


def check_request(lr: Any, max_side: int) -> np.ndarray:
    """Return ``lr`` as a float32 ``(N, 3, H, W)`` array, or raise :class:`RequestError`.

    Triton already enforces dtype, rank and channel count from the model config; they are
    checked again so that this function alone defines what the model accepts.
    """
    if not isinstance(lr, np.ndarray):
        raise RequestError(f"input {INPUT!r} must be an array, got {type(lr).__name__}")
    if lr.dtype != np.float32:
        raise RequestError(f"input {INPUT!r} must be FP32 (float32), got {lr.dtype}")
    if lr.ndim != 4:
        raise RequestError(f"input {INPUT!r} must be N x 3 x H x W (rank 4), got shape {list(lr.shape)}")
    n, c, h, w = lr.shape
    if c != 3:
        raise RequestError(f"input {INPUT!r} must have 3 channels (RGB) in dim 1, got {c} (shape {list(lr.shape)})")
    if n == 0 or h == 0 or w == 0:
        raise RequestError(f"input {INPUT!r} is empty (shape {list(lr.shape)}); send at least one 1x1 image")
    if h > max_side or w > max_side:
        raise RequestError(f"input {INPUT!r} is {h}x{w}, larger than this server's limit of {max_side} pixels "
                           f"per side; tile it on the client (python -m runtimes.serve_client --tile T)")
    return lr


InferFn = Callable[[Sequence[Any]], list[dict[str, np.ndarray]]]


def make_infer_fn(runner: Runner, max_side: int) -> InferFn:
    """The PyTriton inference callable: a list of requests in, one response per request out.

    Requests are grouped by shape and each group runs as one ``runner.infer`` call, so a
    batch Triton formed from equal-size requests is one model call, and a list that
    somehow mixes sizes still runs correctly.
    """

    def infer(requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        arrays = [check_request(request[INPUT], max_side) for request in requests]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, array in enumerate(arrays):
            groups.setdefault(array.shape[1:], []).append(index)
        results: list[np.ndarray | None] = [None] * len(arrays)
        for indices in groups.values():
            batch = torch.from_numpy(np.concatenate([arrays[i] for i in indices]))
            with torch.inference_mode():
                sr = runner.infer(batch).float().cpu().numpy()
            start = 0
            for i in indices:
                results[i] = sr[start:start + len(arrays[i])]
                start += len(arrays[i])
        return [{OUTPUT: result} for result in results]  # type: ignore[misc]  # every slot was filled

    return infer


def stub_library_path(environ: dict[str, str] | None = None) -> str | None:
    """Put this interpreter's libpython folder first on ``LD_LIBRARY_PATH``; return the folder.

    Returns ``None`` (and changes nothing) when this interpreter has no shared libpython,
    in which case the stub can only use the system's and PyTriton may fail to start.
    """
    env = os.environ if environ is None else environ
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not soname or not (Path(libdir) / soname).is_file():
        return None
    rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    return libdir


def _pytriton() -> Any:
    """Import PyTriton or explain how to install it."""
    try:
        import pytriton.triton as triton_module
    except ImportError as exc:
        raise ESCError(f"serving needs PyTriton ({exc}); install it with pip install 'esc-deploy[serve]'") from exc
    return triton_module


def _bind(triton: Any, runner: Runner, options: ServeOptions) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    config = ModelConfig(max_batch_size=options.max_batch,
                         batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_delay_us))
    triton.bind(model_name=MODEL_NAME, infer_func=make_infer_fn(runner, options.max_side),
                inputs=[Tensor(name=INPUT, dtype=np.float32, shape=(3, -1, -1))],
                outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(3, -1, -1))],
                config=config, strict=True)


def endpoints(options: ServeOptions) -> dict[str, str]:
    """The URLs a client uses, by protocol."""
    return {"http": f"http://{options.host}:{options.http_port}",
            "grpc": f"grpc://{options.host}:{options.grpc_port}",
            "metrics": f"http://{options.host}:{options.metrics_port}/metrics"}


def _banner(runner: Runner, options: ServeOptions) -> str:
    urls = endpoints(options)
    batching = (f"dynamic batching of equal-size requests up to {options.max_batch}, "
                f"queue delay {options.max_delay_us} us" if options.max_batch > 1 else "no batching (--max-batch 1)")
    info = runner.describe()
    return "\n".join([
        f"serving model {MODEL_NAME!r}: {info.get('variant') or 'ESC'} x{runner.scale} on {runner.name} "
        f"({info.get('device')}, {runner.precision}) via Triton Inference Server (PyTriton)",
        f"  HTTP     {urls['http']}   (POST /v2/models/{MODEL_NAME}/infer)",
        f"  gRPC     {urls['grpc']}",
        f"  metrics  {urls['metrics']}",
        f"  input {INPUT!r} FP32 N x 3 x H x W in [0, 1] (H, W <= {options.max_side}) -> "
        f"output {OUTPUT!r} FP32 N x 3 x {runner.scale}H x {runner.scale}W; {batching}",
        f"  client:  python -m runtimes.serve_client INPUT OUTPUT --url {urls['http']}",
        READY_LINE,
    ])


def check_ports_free(options: ServeOptions) -> None:
    """Refuse ports already in use now, with their names, instead of Triton's start-up timeout."""
    for flag, port in (("--http-port", options.http_port), ("--grpc-port", options.grpc_port),
                       ("--metrics-port", options.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((options.host, port))
            except OSError as exc:
                raise ESCError(f"{flag} {port} on {options.host} is not available ({exc.strerror}); "
                               f"pick a free port") from None


def serve(runner: Runner, options: ServeOptions, stop: threading.Event) -> None:
    """Serve ``runner`` until ``stop`` is set; Triton is stopped before returning."""
    triton_module = _pytriton()
    from pytriton.exceptions import PyTritonError

    check_ports_free(options)
    if stub_library_path() is None:
        print("warning: this Python has no shared libpython; the Python-backend stub will load the system's, "
              "which may not match it (model initialisation then fails)", file=sys.stderr)
    config = triton_module.TritonConfig(
        http_address=options.host, http_port=options.http_port, grpc_address=options.host,
        grpc_port=options.grpc_port, metrics_address=options.host, metrics_port=options.metrics_port,
        exit_timeout_secs=5)
    with triton_module.Triton(config=config) as triton:
        try:
            _bind(triton, runner, options)
            triton.run()
        except PyTritonError as exc:
            raise ESCError(f"Triton Inference Server did not start: {exc.message}") from None
        print(_banner(runner, options), flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise ESCError("the Triton server stopped unexpectedly; see its log above")
    print("server stopped", flush=True)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports the OS just handed out on ``host`` (for tests and benchmarks)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class ServerProcess:
    """``python -m runtimes.serve`` in a child process with its own process group.

    Why a group: the server starts ``tritonserver``, which starts the Python-backend stub
    and its helpers; :meth:`stop` checks (and, as a last resort, kills) the whole group,
    so a test or benchmark never leaves any of them behind.
    """

    process: subprocess.Popen
    options: ServeOptions
    log: Path

    @classmethod
    def start(cls, artifact: str | os.PathLike[str], options: ServeOptions, log: Path,
              extra_args: Sequence[str] = ()) -> "ServerProcess":
        args = [sys.executable, "-m", "runtimes.serve", os.fspath(artifact), "--http-port", str(options.http_port),
                "--grpc-port", str(options.grpc_port), "--metrics-port", str(options.metrics_port),
                "--max-batch", str(options.max_batch), "--max-delay-us", str(options.max_delay_us),
                "--max-side", str(options.max_side), *extra_args]
        with open(log, "w") as sink:
            process = subprocess.Popen(args, cwd=_REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        return cls(process, options, log)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Return once the server printed its ready line; raise with its log if it exits or hangs."""
        deadline = time.monotonic() + timeout_s
        while READY_LINE not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                status = "exited" if self.process.poll() is not None else f"not ready after {timeout_s:.0f}s"
                self.stop()
                raise ESCError(f"the server {status}:\n{self.log_tail()}")
            time.sleep(0.25)

    def group_alive(self) -> bool:
        """Whether any process of the server's group (tritonserver, stubs) still runs."""
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):  # PermissionError: the id was reused by someone else
            return False
        return True

    def stop(self, timeout_s: float = 15) -> tuple[float, bool]:
        """SIGTERM, then wait for the whole group; returns (seconds, whether SIGKILL was needed)."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout_s)
        while self.group_alive() and time.monotonic() - start < timeout_s:
            time.sleep(0.1)
        killed = self.group_alive()
        if killed:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        return time.monotonic() - start, killed


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeOptions()
    parser = argparse.ArgumentParser(
        prog="python -m runtimes.serve",
        description="Serve an ESC artifact on Triton Inference Server (PyTriton) on 127.0.0.1: model 'esc', "
                    "input 'lr' FP32 N x 3 x H x W in [0, 1], output 'sr'.",
        epilog="examples:\n"
               "  python -m runtimes.serve artifacts/esc_x4.onnx --max-batch 8 --max-delay-us 2000\n"
               "  python -m runtimes.serve openvino:artifacts/esc_x4.onnx --http-port 9000 --max-batch 1\n"
               "then, from another shell:\n"
               "  python -m runtimes.serve_client photos/ out/ --url http://127.0.0.1:8000 --concurrency 4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="model.onnx (ONNX Runtime), openvino:model.onnx, a checkpoint or an engine")
    for endpoint, what in (("http", "HTTP/REST"), ("grpc", "gRPC"), ("metrics", "Prometheus metrics")):
        default = getattr(defaults, f"{endpoint}_port")
        parser.add_argument(f"--{endpoint}-port", type=_port, default=default,
                            help=f"{what} port on 127.0.0.1 (default {default})")
    parser.add_argument("--max-batch", type=positive_int, default=defaults.max_batch,
                        help=f"largest batch the dynamic batcher forms (default {defaults.max_batch}; 1 = no batching)")
    parser.add_argument("--max-delay-us", type=non_negative_int, default=defaults.max_delay_us,
                        help=f"longest a request waits for others to batch with (default {defaults.max_delay_us})")
    parser.add_argument("--max-side", type=positive_int, default=defaults.max_side,
                        help=f"larger inputs are refused (default {defaults.max_side})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the runtime")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = ServeOptions(http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                           max_batch=args.max_batch, max_delay_us=args.max_delay_us, max_side=args.max_side)
    if len({options.http_port, options.grpc_port, options.metrics_port}) < 3:
        print("error: --http-port, --grpc-port and --metrics-port must differ", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        _pytriton()
        with load(args.artifact, device=args.device, **({"threads": args.threads} if args.threads else {})) as runner:
            serve(runner, options, stop)
    except ESCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:  # main() may run inside another program (tests): give its handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
