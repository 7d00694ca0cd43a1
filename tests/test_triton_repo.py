"""export/to_triton.py: the generated repository, read back with Triton's own config schema.

The configs are parsed with ``model_config_pb2`` as tritonclient ships it (the schema
Triton itself loads), so a misspelt field or a wrong enum fails here.  The artifacts are
tiny hand-built ONNX graphs (nearest x2 resize with ``esc.*`` metadata): what is tested is
the repository, not the model.  The tiler of fixed-shape engines is run on numpy with a
nearest-neighbour "engine", whose exact output any correct tiling must reproduce, and once
inside a real tritonserver (the one PyTriton bundles) talking to its engine through BLS.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from optional_deps import need, skip_or_fail

from export import triton_repo
from export.triton_repo import RepoOptions, TritonRepoError, write_repository
from runtimes.metadata import ArtifactMetadata, write_sidecar

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_onnx(path: Path, shape: tuple[Any, Any] = ("H", "W"), batch: Any = "N", dtype: str = "float32",
              scale: int | None = 2, domain: str = "") -> Path:
    """An ``lr -> sr`` nearest x2 graph with ESC metadata (``shape``/``batch``: ints or symbols)."""
    import onnx
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    out_hw = [s * 2 if isinstance(s, int) else f"{s}2" for s in shape]
    lr = helper.make_tensor_value_info("lr", elem, [batch, 3, *shape])
    sr = helper.make_tensor_value_info("sr", elem, [batch, 3, *out_hw])
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    node = helper.make_node("Resize", ["lr", "", "scales"], ["sr"], mode="nearest", domain=domain)
    graph = helper.make_graph([node], "tiny", [lr], [sr], initializer=[scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    meta = ArtifactMetadata(variant="esc_light", scale=scale, io_dtype=dtype,
                            shape="dynamic" if isinstance(shape[0], str) else f"{shape[0]}x{shape[1]}")
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def pb() -> Any:
    """tritonclient's model-config protobuf module (the schema Triton reads)."""
    return need("tritonclient.grpc.model_config_pb2",
                "tritonclient[grpc] is not installed (pip install 'esc-deploy[serve]')", group="serve")


def parse_config(pb: Any, path: Path) -> Any:
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), pb.ModelConfig())


def load_tiler(repo: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tiler_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dynamic_onnx_repository(tmp_path: Path, pb: Any) -> None:
    artifact = tiny_onnx(tmp_path / "esc.onnx")
    options = RepoOptions(max_batch=8, preferred=(2, 8), delay_us=1500, instances=3)
    info, written = write_repository(artifact, tmp_path / "repo", options)
    config = parse_config(pb, tmp_path / "repo" / "esc" / "config.pbtxt")

    assert config.name == "esc" and config.backend == "onnxruntime" and config.max_batch_size == 8
    (inp,), (out,) = config.input, config.output
    assert (inp.name, list(inp.dims), inp.data_type) == ("lr", [3, -1, -1], pb.TYPE_FP32)
    assert (out.name, list(out.dims), out.data_type) == ("sr", [3, -1, -1], pb.TYPE_FP32)
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500
    (group,) = config.instance_group
    assert (group.count, group.kind) == (3, pb.ModelInstanceGroup.KIND_CPU)
    (warmup,) = config.model_warmup
    sample = warmup.inputs["lr"]
    assert warmup.batch_size == 1 and list(sample.dims) == [3, 32, 32] and sample.random_data
    assert config.parameters["esc.scale"].string_value == "2"
    assert (tmp_path / "repo" / "esc" / "1" / "model.onnx").read_bytes() == artifact.read_bytes()
    assert not (tmp_path / "repo" / "esc_tiled").exists()
    assert set(written) == {tmp_path / "repo" / "esc" / "config.pbtxt", tmp_path / "repo" / "esc" / "1" / "model.onnx"}


def test_fixed_shape_gets_a_tiling_python_model(tmp_path: Path, pb: Any) -> None:
    artifact = tiny_onnx(tmp_path / "fixed.onnx", shape=(16, 24))
    write_repository(artifact, tmp_path / "repo", RepoOptions(name="sr16", overlap=4))
    engine = parse_config(pb, tmp_path / "repo" / "sr16" / "config.pbtxt")
    assert list(engine.input[0].dims) == [3, 16, 24] and list(engine.output[0].dims) == [3, 32, 48]
    assert list(engine.model_warmup[0].inputs["lr"].dims) == [3, 16, 24]

    tiler = parse_config(pb, tmp_path / "repo" / "sr16_tiled" / "config.pbtxt")
    assert tiler.backend == "python" and tiler.max_batch_size == 0
    assert list(tiler.input[0].dims) == [-1, 3, -1, -1] and list(tiler.output[0].dims) == [-1, 3, -1, -1]
    params = {k: v.string_value for k, v in tiler.parameters.items()}
    assert params["engine_model"] == "sr16" and (params["tile_height"], params["tile_width"]) == ("16", "24")
    assert (params["overlap"], params["scale"], params["engine_batch"]) == ("4", "2", "8")


@pytest.mark.parametrize("size", [(16, 24), (37, 23), (5, 61), (1, 1), (100, 30)])
def test_tiler_reproduces_the_untiled_image(tmp_path: Path, size: tuple[int, int]) -> None:
    """A pixel-local engine (nearest x2) makes any seam, gap or misplaced window visible."""
    write_repository(tiny_onnx(tmp_path / "fixed.onnx", shape=(16, 24)), tmp_path / "repo", RepoOptions(overlap=4))
    tiler = load_tiler(tmp_path / "repo", "esc_tiled")
    calls: list[tuple[int, ...]] = []

    def engine(windows: np.ndarray) -> np.ndarray:
        calls.append(windows.shape)
        return windows.repeat(2, axis=2).repeat(2, axis=3)

    image = np.random.default_rng(0).random((3, *size), dtype=np.float32)
    out = tiler.tiled_upscale(image, engine, (16, 24), 2, 4, 3)
    np.testing.assert_array_equal(out, image.repeat(2, axis=1).repeat(2, axis=2))
    assert all(shape[0] <= 3 and shape[1:] == (3, 16, 24) for shape in calls)


def blur_then_nearest_x2(windows: np.ndarray, radius: int) -> np.ndarray:
    """An engine with a receptive field: a (2r+1)^2 box mean (edge-padded), then nearest x2."""
    padded = np.pad(windows, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    h, w = windows.shape[2:]
    size = 2 * radius + 1
    mean = sum(padded[:, :, dy:dy + h, dx:dx + w] for dy in range(size) for dx in range(size)) / size ** 2
    return mean.repeat(2, axis=2).repeat(2, axis=3)


@pytest.mark.parametrize("size", [(24, 40), (40, 56), (32, 72)])
def test_tiler_keeps_every_pixel_its_context(tmp_path: Path, size: tuple[int, int]) -> None:
    """An engine that looks ``overlap`` pixels around each output pixel gives the untiled image;
    one that looks one pixel further does not: the overlap, not luck, makes the seams vanish.

    The sizes are whole steps of windows (16x24 windows, 8 and 16 pixels apart) so that the
    kept pixels nearest a seam have exactly ``overlap`` pixels of context, no more."""
    overlap = 4
    write_repository(tiny_onnx(tmp_path / "fixed.onnx", shape=(16, 24)), tmp_path / "repo",
                     RepoOptions(overlap=overlap))
    tiler = load_tiler(tmp_path / "repo", "esc_tiled")
    image = np.random.default_rng(1).random((3, *size), dtype=np.float32)
    for radius, seamless in ((overlap, True), (overlap + 1, False)):
        out = tiler.tiled_upscale(image, lambda w, r=radius: blur_then_nearest_x2(w, r), (16, 24), 2, overlap, 3)
        whole = blur_then_nearest_x2(image[None], radius)[0]
        err = float(np.abs(out - whole).max())
        assert (err < 1e-6) == seamless, f"radius {radius}: max abs {err:.3g} between tiled and untiled"


def test_tiler_refuses_bad_requests(tmp_path: Path) -> None:
    write_repository(tiny_onnx(tmp_path / "fixed.onnx", shape=(16, 16)), tmp_path / "repo", RepoOptions(overlap=4))
    check = load_tiler(tmp_path / "repo", "esc_tiled").check_input
    assert check(np.zeros((1, 3, 8, 8), np.float32), 64) is None
    assert "FP32" in check(np.zeros((1, 3, 8, 8), np.float64), 64)
    assert "N x 3 x H x W" in check(np.zeros((1, 4, 8, 8), np.float32), 64)
    assert "empty" in check(np.zeros((1, 3, 0, 8), np.float32), 64)
    assert "limit of 64" in check(np.zeros((1, 3, 65, 8), np.float32), 64)


def test_static_batch_and_fp16_io(tmp_path: Path, pb: Any) -> None:
    artifact = tiny_onnx(tmp_path / "b1.onnx", shape=(16, 16), batch=1, dtype="float16")
    write_repository(artifact, tmp_path / "repo", RepoOptions(overlap=4))
    config = parse_config(pb, tmp_path / "repo" / "esc" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 3, 16, 16] and config.input[0].data_type == pb.TYPE_FP16
    assert list(config.model_warmup[0].inputs["lr"].dims) == [1, 3, 16, 16]
    tiler = parse_config(pb, tmp_path / "repo" / "esc_tiled" / "config.pbtxt")
    params = {k: v.string_value for k, v in tiler.parameters.items()}
    assert (params["engine_batch"], params["engine_dtype"]) == ("0", "float16")


def test_tensorrt_plan(tmp_path: Path, pb: Any) -> None:
    engine = tmp_path / "esc_x2.engine"
    engine.write_bytes(b"not really an engine")
    write_sidecar(engine, ArtifactMetadata(variant="esc", scale=2, io_dtype="float16"),
                  {"profile": {"min": [1, 3, 32, 32], "opt": [4, 3, 256, 256], "max": [4, 3, 512, 512]}})
    write_repository(engine, tmp_path / "repo", RepoOptions(max_batch=16, preferred=(4, 16)))
    config = parse_config(pb, tmp_path / "repo" / "esc" / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4  # capped by the profile
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.input[0].data_type == pb.TYPE_FP16 and list(config.input[0].dims) == [3, -1, -1]
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(config.model_warmup[0].inputs["lr"].dims) == [3, 256, 256]
    assert (tmp_path / "repo" / "esc" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    with pytest.raises(TritonRepoError, match="GPU"):
        write_repository(engine, tmp_path / "repo2", RepoOptions(kind="cpu"))


def junk(path: Path) -> Path:
    path.write_bytes(b"\x00garbage")
    return path


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing.onnx", "no such artifact"),
    (lambda d: junk(d / "model.pth"), "export one first"),
    (lambda d: junk(d / "junk.onnx"), "not a readable ONNX model"),
    (lambda d: tiny_onnx(d / "noscale.onnx", scale=None), "no esc.scale metadata"),
    (lambda d: tiny_onnx(d / "plugin.onnx", domain="esc"), "custom operator domain"),
    (lambda d: junk(d / "bare.engine"), "no sidecar"),
], ids=["missing", "checkpoint", "junk-onnx", "no-scale", "plugin-form", "engine-without-sidecar"])
def test_bad_artifacts_are_named(tmp_path: Path, make: Any, match: str) -> None:
    with pytest.raises(TritonRepoError, match=match):
        write_repository(make(tmp_path), tmp_path / "repo")
    assert not (tmp_path / "repo" / "esc").exists()


def test_bad_options_are_named(tmp_path: Path) -> None:
    artifact = tiny_onnx(tmp_path / "esc.onnx")
    with pytest.raises(TritonRepoError, match="preferred batch"):
        write_repository(artifact, tmp_path / "repo", RepoOptions(max_batch=4, preferred=(8,)))
    with pytest.raises(TritonRepoError, match="plain folder name"):
        write_repository(artifact, tmp_path / "repo", RepoOptions(name="a/b"))
    with pytest.raises(TritonRepoError, match="overlap"):
        write_repository(tiny_onnx(tmp_path / "f.onnx", shape=(16, 16)), tmp_path / "repo", RepoOptions(overlap=8))


def test_failed_write_keeps_the_old_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifact = tiny_onnx(tmp_path / "fixed.onnx", shape=(16, 16))
    repo = tmp_path / "repo"
    write_repository(artifact, repo, RepoOptions(overlap=4))
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    def broken_copy(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(triton_repo.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        write_repository(artifact, repo, RepoOptions(overlap=4, max_batch=2, preferred=(2,)))
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before  # neither model folder was replaced, and no temporary folder is left


def test_cli_summary_and_error(tmp_path: Path) -> None:
    artifact = tiny_onnx(tmp_path / "esc.onnx")
    cmd = [sys.executable, str(REPO_ROOT / "export" / "to_triton.py")]
    ok = subprocess.run([*cmd, str(artifact), "-o", str(tmp_path / "repo"), "--instances", "2"],
                        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "tritonserver --model-repository=/models" in ok.stdout and "config.pbtxt" in ok.stdout
    assert "2 instance(s)" in ok.stdout
    bad = subprocess.run([*cmd, str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "repo2")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: no such artifact") and "Traceback" not in bad.stderr
    assert not (tmp_path / "repo2").exists()
    helped = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "python export/to_triton.py artifacts/esc_x4.onnx -o model_repository" in helped.stdout


def test_parameters_escape_quotes(pb: Any) -> None:
    text = triton_repo._parameters({"esc.note": 'say "hi" \\ bye'})
    from google.protobuf import text_format

    config = text_format.Parse(text, pb.ModelConfig())
    assert config.parameters["esc.note"].string_value == 'say "hi" \\ bye'


NEAREST_ENGINE = '''
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        arrays = [pb.get_input_tensor_by_name(r, "lr").as_numpy() for r in requests]
        return [pb.InferenceResponse(output_tensors=[pb.Tensor("sr", a.repeat(2, axis=2).repeat(2, axis=3))])
                for a in arrays]
'''


def bundled_tritonserver(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """PyTriton's own tritonserver, a backend folder with the stub for this Python, and its env."""
    pytriton = need("pytriton", "nvidia-pytriton is not installed (it bundles tritonserver)", group="serve")
    from runtimes.serve import stub_library_path

    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / \
        "triton_python_backend_stub"
    if not (root / "bin" / "tritonserver").is_file() or not stub.is_file():
        skip_or_fail(f"this PyTriton has no tritonserver or stub for Python {sys.version_info[:2]} under {root}",
                     group="serve")
    backends = tmp_path / "backends"
    shutil.copytree(root / "backends" / "python", backends / "python")
    shutil.copy2(stub, backends / "python")
    env = dict(os.environ, LD_LIBRARY_PATH=str(libs))
    stub_library_path(env)
    return root / "bin" / "tritonserver", backends, env


def test_tiler_serves_in_a_real_triton_server(tmp_path: Path) -> None:
    """The generated Python model in tritonserver (PyTriton's build), a Python stand-in for the engine.

    The bundled server has no onnxruntime backend, so ``esc`` becomes a nearest x2 Python
    model with the same config; ``esc_tiled`` is exactly what was generated and reaches it
    through BLS requests.
    """
    server, backends, env = bundled_tritonserver(tmp_path)  # skips without PyTriton (which brings tritonclient)
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    from runtimes.serve import free_ports

    repo = tmp_path / "repo"
    write_repository(tiny_onnx(tmp_path / "fixed.onnx", shape=(16, 24)), repo,
                     RepoOptions(overlap=4, max_batch=4, preferred=(4,), max_side=128))
    (repo / "esc" / "1" / "model.onnx").unlink()
    (repo / "esc" / "1" / "model.py").write_text(NEAREST_ENGINE)
    config = repo / "esc" / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "onnxruntime"', 'backend: "python"'))
    http, grpc = free_ports(2)
    with open(tmp_path / "server.log", "w") as log:
        process = subprocess.Popen(
            [str(server), f"--model-repository={repo}", f"--backend-directory={backends}", "--allow-metrics=false",
             "--http-address=127.0.0.1", f"--http-port={http}", "--grpc-address=127.0.0.1", f"--grpc-port={grpc}",
             "--exit-timeout-secs=3"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = triton_http.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 60
        while not _ready(client, "esc_tiled"):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        rng = np.random.default_rng(0)
        for shape in [(1, 3, 16, 24), (2, 3, 37, 23), (1, 3, 5, 61), (1, 3, 100, 30)]:
            image = rng.random(shape, dtype=np.float32)
            np.testing.assert_array_equal(_infer(client, image), image.repeat(2, axis=2).repeat(2, axis=3))
        for bad, names in ((np.zeros((1, 3, 129, 4), np.float32), "limit of 128"),
                           (np.zeros((1, 3, 0, 4), np.float32), "empty")):
            with pytest.raises(InferenceServerException, match=names):
                _infer(client, bad)
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the backend stubs, should any outlive the server
        process.wait(5)


def _ready(client: Any, model: str) -> bool:
    try:
        return client.is_model_ready(model)
    except Exception:  # not listening yet
        return False


def _infer(client: Any, image: np.ndarray) -> np.ndarray:
    import tritonclient.http as triton_http

    request = triton_http.InferInput("lr", list(image.shape), "FP32")
    request.set_data_from_numpy(image)
    return client.infer("esc_tiled", [request]).as_numpy("sr")
