"""runtimes.serve on a real Triton server (PyTriton) and runtimes.serve_client against it.

One server per module, on free 127.0.0.1 ports, serving a one-block esc_light x2 (random
weights, exported to ONNX once) through ONNX Runtime with dynamic batching.  The tests send
64 requests of mixed sizes from 8 concurrent clients (HTTP and gRPC) and compare each
answer with the same runner called directly; send the bad requests a server must survive;
run the file client; and finally stop the server with SIGTERM and check that it and every
process it started are gone within seconds.  The fixture kills whatever is left (the whole
process group), so no test leaves a server behind.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from optional_deps import need

need("pytriton", "nvidia-pytriton is not installed (pip install 'esc-deploy[serve]')", group="serve")
need("tritonclient.grpc", "tritonclient[grpc,http] is not installed (pip install 'esc-deploy[serve]')", group="serve")

import tritonclient.http as triton_http  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from runtimes import serve, serve_client  # noqa: E402
from runtimes.base import Runner, RunnerError, load  # noqa: E402
from runtimes.serve import ServeOptions, ServerProcess, free_ports  # noqa: E402
from runtimes.serve_client import TritonRunner, read_metric  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_SIDE = 64
SIZES = [(12, 16), (20, 20), (24, 9), (7, 30)]
START_TIMEOUT_S = 120
#: Stopping takes about 4 s idle and 8 s with the 2 cores loaded (unloading the model, the stub).
STOP_TIMEOUT_S = 15


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def url(server: ServerProcess, protocol: str) -> str:
    port = server.options.grpc_port if protocol == "grpc" else server.options.http_port
    return f"{protocol}://127.0.0.1:{port}"


def http_client(server: ServerProcess) -> Any:
    return triton_http.InferenceServerClient(f"127.0.0.1:{server.options.http_port}")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """esc_light x2 cut to one block (random weights), dynamic-shape fp32 ONNX (opset 18).

    One block keeps every operator of ESC (convolutions, dynamic kernel, window attention)
    while exporting in about 25 s instead of 60 s and running several times faster on two
    cores: what is tested is the serving, not the picture.
    """
    from export.onnx_export import export_onnx
    from models import get_variant
    from models.loader import build, randomise

    path = tmp_path_factory.mktemp("serve") / "esc_light_x2_1block.onnx"
    model = build(dataclasses.replace(get_variant("esc_light").build_config(2), n_blocks=1, conv_blocks=1))
    randomise(model)
    model.set_attention("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model.eval(), path, opset=18, precision="fp32", shape="dynamic", simplify=False)
    return path


@pytest.fixture(scope="module")
def server(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    http_port, grpc_port, metrics_port = free_ports(3)
    options = ServeOptions(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, max_batch=8,
                           max_delay_us=20000, max_side=MAX_SIDE)
    srv = ServerProcess.start(artifact, options, tmp_path_factory.mktemp("serve-log") / "serve.log",
                              extra_args=["--threads", "2"])
    try:
        srv.wait_ready(START_TIMEOUT_S)
        yield srv
    finally:
        srv.stop()  # a no-op after the last test stopped it; kills the whole group if anything is left


@pytest.fixture(scope="module")
def runner(artifact: Path) -> Iterator[Any]:
    with load(artifact, threads=2) as direct:
        yield direct


def size_of(request: int) -> tuple[int, int]:
    """Request ``w * 8 + k`` (wave w, client k): six clients share one size per wave, two another.

    So every wave has equal-size requests in flight together (the batcher can merge them)
    and a different size among them (it must not).
    """
    wave, client = divmod(request, 8)
    return SIZES[(wave + (client >= 6)) % len(SIZES)]


def test_concurrent_mixed_sizes_match_the_direct_runner(server: ServerProcess, runner: Any) -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, *size_of(i)), dtype=np.float32) for i in range(64)]
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []
    lock = threading.Lock()
    wave_start = threading.Barrier(8, timeout=120)
    clients = [TritonRunner(url(server, "http")), TritonRunner(url(server, "grpc"))]
    assert all(c.scale == 2 for c in clients)

    def worker(k: int) -> None:
        client = clients[k % 2]  # 4 threads over HTTP, 4 over gRPC; each thread has its own connection
        for i in range(k, 64, 8):
            wave_start.wait()
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
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in range(64):
        by_size.setdefault(size_of(i), []).append(i)
    for ids in by_size.values():  # the direct runner, one call per size (batching is exact to 1e-5 too)
        expected = runner.infer(torch.from_numpy(np.concatenate([images[i] for i in ids]))).numpy()
        for row, i in enumerate(ids):
            assert results[i].shape == expected[row:row + 1].shape
            np.testing.assert_allclose(results[i], expected[row:row + 1], rtol=0, atol=1e-5, err_msg=f"request {i}")

    metrics = f"http://127.0.0.1:{server.options.metrics_port}/metrics"
    inferences = read_metric(metrics, "nv_inference_count")
    executions = read_metric(metrics, "nv_inference_exec_count")
    assert inferences >= 64 + 2  # + the two clients' scale probes
    assert executions < inferences, "no two requests were ever batched together"


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
def test_bad_request_fails_cleanly_and_serving_goes_on(server: ServerProcess, array: np.ndarray, dtype: str,
                                                       names: str) -> None:
    client = http_client(server)
    with pytest.raises(InferenceServerException) as caught:
        _send(client, array, dtype)
    assert names in caught.value.message()
    good = np.random.default_rng(1).random((1, 3, 10, 14), dtype=np.float32)
    assert _send(client, good).shape == (1, 3, 20, 28)
    assert server.process.poll() is None, server.log_tail()


def test_client_refuses_empty_images_before_sending(server: ServerProcess) -> None:
    with TritonRunner(url(server, "http")) as client, pytest.raises(RunnerError, match="empty"):
        client.infer(torch.zeros(1, 3, 0, 5))


def test_file_client_over_grpc(server: ServerProcess, tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(2)
    for name, size in (("a.png", (20, 12)), ("b.png", (20, 12)), ("c.png", (9, 31))):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(src / name)
    (src / "broken.png").write_bytes(b"not an image")
    done = subprocess.run([sys.executable, "-m", "runtimes.serve_client", str(src), str(tmp_path / "out"),
                           "--url", url(server, "grpc"), "--concurrency", "3", "--quiet"],
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


def test_server_command_errors(artifact: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        assert serve.main([str(artifact), "--http-port", taken, *(f"--{p}-port={q}" for p, q in
                                                                zip(("grpc", "metrics"), free_ports(2)))]) == 2
        assert f"--http-port {taken} on 127.0.0.1 is not available" in capsys.readouterr().err
    assert serve.main([str(artifact), "--http-port", "9000", "--grpc-port", "9000"]) == 2
    assert "must differ" in capsys.readouterr().err
    assert serve.main([str(artifact.with_name("missing.onnx"))]) == 2
    assert "no such artifact" in capsys.readouterr().err


def test_sigterm_stops_the_server_and_everything_it_started(server: ServerProcess) -> None:
    """The last test that uses the server: the ones above need it running."""
    assert server.process.poll() is None, server.log_tail()
    seconds, killed = server.stop(STOP_TIMEOUT_S)
    assert not killed, f"tritonserver or a backend stub outlived the server ({seconds:.1f}s):\n{server.log_tail()}"
    assert server.process.returncode == 0 and seconds < STOP_TIMEOUT_S, server.log_tail()
    ports = (server.options.http_port, server.options.grpc_port, server.options.metrics_port)
    assert not any(port_open(port) for port in ports)
    assert "server stopped" in server.log.read_text()


class _Nearest(Runner):
    """A x2 nearest-neighbour 'model' that records the batches it was given."""

    name, artifact, scale, input_multiple, fixed_shape, precision, device = "nearest", "-", 2, 1, None, "fp32", "cpu"

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def _infer(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(batch.shape))
        return batch.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def test_infer_fn_groups_equal_shapes_and_keeps_the_order() -> None:
    model = _Nearest()
    infer = serve.make_infer_fn(model, max_side=64)
    arrays = [np.full((n, 3, h, w), i, np.float32) for i, (n, h, w) in enumerate([(1, 4, 5), (2, 6, 6), (1, 4, 5)])]
    answers = infer([{"lr": a} for a in arrays])
    assert sorted(model.calls) == [(2, 3, 4, 5), (2, 3, 6, 6)]  # the two 4x5 requests ran as one batch
    for array, answer in zip(arrays, answers):
        np.testing.assert_array_equal(answer["sr"], array.repeat(2, axis=2).repeat(2, axis=3))
    with pytest.raises(serve.RequestError, match="limit of 64 pixels"):
        infer([{"lr": np.zeros((1, 3, 65, 2), np.float32)}])


def test_stub_library_path_puts_this_pythons_libdir_first() -> None:
    import sysconfig

    env = {"LD_LIBRARY_PATH": f"/somewhere:{sysconfig.get_config_var('LIBDIR')}"}
    libdir = serve.stub_library_path(env)
    if libdir is None:
        pytest.skip("this Python has no shared libpython")
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/somewhere"
