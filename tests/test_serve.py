"""runtimes.serve on a real Triton server (PyTriton) and runtimes.serve_client against it.

One server per module, on free 127.0.0.1 ports, serving esc_light x2 (random weights,
exported to ONNX once) through ONNX Runtime with dynamic batching.  The tests send 64
requests of mixed sizes from 8 concurrent clients (HTTP and gRPC) and compare each answer
with the same runner called directly; send the bad requests a server must survive; run
the file client; and finally stop the server with SIGTERM and check that it and every
process it started are gone within seconds.  The fixture kills whatever is left, so no
test leaves a server behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'esc-deploy[serve]')")
pytest.importorskip("tritonclient.grpc", reason="tritonclient[all] is not installed (pip install 'esc-deploy[serve]')")

import tritonclient.http as triton_http  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from runtimes.base import RunnerError, load  # noqa: E402
from runtimes import serve_client  # noqa: E402
from runtimes.serve_client import TritonRunner  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SIDE = 64
SIZES = [(12, 16), (20, 20), (24, 9), (7, 30)]
START_TIMEOUT_S = 120
#: Stopping takes about 4 s idle and 8 s with the 2 cores loaded (unloading the model, the stub).
STOP_TIMEOUT_S = 15


@dataclass
class Server:
    process: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def free_ports(count: int) -> list[int]:
    """Ports the OS just handed out on 127.0.0.1 (held open together so they differ)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a recycled group id owned by someone else: ours is gone
        return False
    return True


def port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """esc_light x2, random weights, dynamic-shape fp32 ONNX (opset 18)."""
    from export.onnx_export import export_onnx
    from models import create_model

    path = tmp_path_factory.mktemp("serve") / "esc_light_x2.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(create_model("esc_light", 2, attention="sdpa"), path, opset=18, precision="fp32",
                    shape="dynamic", simplify=False)
    return path


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtimes.serve", str(artifact), "--http-port", str(http_port),
             "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--max-batch", "8",
             "--max-delay-us", "20000", "--max-side", str(MAX_SIDE), "--threads", "2"],
            cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", f"127.0.0.1:{metrics_port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "ready; Ctrl-C" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start (exit {process.poll()}):\n{srv.log_tail()}")
            time.sleep(0.5)
        yield srv
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        if group_alive(process.pid):  # whatever outlived the stop (tritonserver, stubs): killed, never left
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@pytest.fixture(scope="module")
def runner(artifact: Path) -> Iterator[Any]:
    with load(artifact, threads=2) as direct:
        yield direct


def test_concurrent_mixed_sizes_match_the_direct_runner(server: Server, runner: Any) -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, *SIZES[i % len(SIZES)]), dtype=np.float32) for i in range(64)]
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []
    lock = threading.Lock()
    clients = [TritonRunner(f"http://{server.http}"), TritonRunner(f"grpc://{server.grpc}")]
    assert all(c.scale == 2 for c in clients)

    def worker(k: int) -> None:
        client = clients[k % 2]  # 4 threads over HTTP, 4 over gRPC; each thread has its own connection
        for i in range(k, 64, 8):
            try:
                out = client.infer(torch.from_numpy(images[i])).numpy()
            except Exception as exc:  # collected and reported below: a thread must not die silently
                with lock:
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                results[i] = out

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    assert not errors, errors
    assert sorted(results) == list(range(64)), "some requests got no answer"
    for size in range(len(SIZES)):  # the direct runner, one call per size (batching is exact to 1e-5 too)
        ids = list(range(size, 64, len(SIZES)))
        expected = runner.infer(torch.from_numpy(np.concatenate([images[i] for i in ids]))).numpy()
        for row, i in enumerate(ids):
            assert results[i].shape == expected[row:row + 1].shape
            np.testing.assert_allclose(results[i], expected[row:row + 1], rtol=0, atol=1e-5, err_msg=f"request {i}")

    inferences, executions = metric(server, "nv_inference_count"), metric(server, "nv_inference_exec_count")
    assert inferences >= 64 + 2  # + the two clients' scale probes
    assert executions < inferences, "no two requests were ever batched together"


def metric(server: Server, name: str) -> float:
    """A counter of model ``esc`` from the server's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://{server.metrics}/metrics", timeout=10).read().decode()
    match = re.search(rf'^{name}{{[^}}]*model="esc"[^}}]*}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name} not in the metrics:\n{text[:2000]}"
    return float(match.group(1))


def _send(client: Any, array: np.ndarray, dtype: str = "FP32") -> np.ndarray:
    request = triton_http.InferInput("lr", list(array.shape), dtype)
    request.set_data_from_numpy(array)
    return client.infer("esc", [request]).as_numpy("sr")


@pytest.mark.parametrize("array, dtype, names", [
    (np.zeros((1, 3, 8, 8), np.float64), "FP64", "FP64"),
    (np.zeros((3, 8, 8), np.float32), "FP32", "unexpected shape"),
    (np.zeros((1, 1, 3, 8, 8), np.float32), "FP32", "unexpected shape"),
    (np.zeros((1, 4, 8, 8), np.float32), "FP32", "Expected [-1,3,-1,-1]"),
    (np.zeros((1, 3, 0, 8), np.float32), "FP32", "zeros in shape"),
    (np.zeros((0, 3, 8, 8), np.float32), "FP32", "byte size"),
    (np.zeros((1, 3, MAX_SIDE + 1, 8), np.float32), "FP32", f"limit of {MAX_SIDE} pixels"),
], ids=["dtype", "rank-3", "rank-5", "4-channels", "empty-height", "empty-batch", "oversized"])
def test_bad_request_fails_cleanly_and_serving_goes_on(server: Server, array: np.ndarray, dtype: str,
                                                       names: str) -> None:
    client = triton_http.InferenceServerClient(server.http)
    with pytest.raises(InferenceServerException) as caught:
        _send(client, array, dtype)
    assert names in caught.value.message()
    good = np.random.default_rng(1).random((1, 3, 10, 14), dtype=np.float32)
    assert _send(client, good).shape == (1, 3, 20, 28)
    assert server.process.poll() is None, server.log_tail()


def test_client_refuses_empty_images_before_sending(server: Server) -> None:
    with TritonRunner(f"http://{server.http}") as client, pytest.raises(RunnerError, match="empty"):
        client.infer(torch.zeros(1, 3, 0, 5))


def test_file_client_over_grpc(server: Server, tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for name, size in (("a.png", (20, 12)), ("b.png", (20, 12)), ("c.png", (9, 31))):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(src / name)
    (src / "broken.png").write_bytes(b"not an image")
    done = subprocess.run([sys.executable, "-m", "runtimes.serve_client", str(src), str(tmp_path / "out"),
                           "--url", f"grpc://{server.grpc}", "--concurrency", "3", "--quiet"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # one file skipped
    assert "broken.png" in done.stderr and "Traceback" not in done.stderr
    for name, (h, w) in (("a.png", (20, 12)), ("b.png", (20, 12)), ("c.png", (9, 31))):
        assert Image.open(tmp_path / "out" / name).size == (2 * w, 2 * h)
    assert "upscaled 3 file(s), 1 failed" in done.stdout


def test_client_names_a_missing_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    (tmp_path / "x.png").write_bytes(b"")
    status = serve_client.main([str(tmp_path / "x.png"), str(tmp_path / "y.png"),
                                "--url", f"http://127.0.0.1:{port}", "--timeout", "1"])
    assert status == 2 and "no Triton server answers" in capsys.readouterr().err


def test_sigterm_stops_the_server_and_everything_it_started(server: Server) -> None:
    """Last in the module: the other tests use the running server."""
    assert server.process.poll() is None, server.log_tail()
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(STOP_TIMEOUT_S) == 0, server.log_tail()
    while group_alive(server.process.pid) and time.monotonic() - started < STOP_TIMEOUT_S:
        time.sleep(0.2)
    assert not group_alive(server.process.pid), "tritonserver or a backend stub outlived the server"
    assert time.monotonic() - started < STOP_TIMEOUT_S
    assert not any(port_open(a) for a in (server.http, server.grpc, server.metrics))
    assert "server stopped" in server.log.read_text()
