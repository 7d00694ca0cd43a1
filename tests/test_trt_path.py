"""The TensorRT path: plugin-form ONNX, its ONNX Runtime reference, the TensorRT plugin, CLI, runner.

Without TensorRT and a GPU (the CI machines) this checks everything up to the engine:

* every golden checkpoint exported in plugin form (static golden size, batch 1: export
  is ~20-45 s per model here; shared with the other TensorRT modules through ``artifacts``)
  runs in ONNX Runtime CPU through the reference node and reproduces the golden ``sr``
  within the fp32 parity threshold (``threshold_for("fp32")``);
* the graph: no Softmax, no Reshape to rank >= 6, one plugin node per block with the
  attribute layout TensorRT's ONNX parser needs, the table as an initializer;
* ``export/to_trt.py`` writes a valid plugin-form ONNX, names TensorRT as missing and
  exits 2; ``--dry-run`` exits 0 (a tiny 16x16-window checkpoint: size does not matter);
* the AOT kernel compiles to PTX for sm_90 without a GPU; the plugin itself runs through
  NVIDIA's real ``tensorrt.plugin`` in ``test_trt_real_plugin.py``, the TensorRT API the
  build and runner use is checked in ``test_trt_api_surface.py``;
* the native path marks parsed ``IAttention``s on a network that behaves like pybind11's;
* the TensorRT runner refuses clearly without TensorRT.

A ``gpu``-marked test builds and runs real engines where TensorRT and CUDA exist.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import trt_real
from conftest import golden_index
from onnx import TensorProto, helper, numpy_helper
from plugin_exports import PLUGIN_CASE, golden_plugin_export, window16_checkpoint
from trt_stub_api import StubAPI, fake_tensorrt, parsed_network, tensorrt_api_or_skip

from export.plugin_onnx import (
    PluginExportError,
    verify_plugin_graph,
)
from models.kernels.reference import window_attention_reference
from runtimes.plugin_ops.contract import (
    AOT_ATTRIBUTE,
    NAMESPACE_ATTRIBUTE,
    PLUGIN_DOMAIN,
    PLUGIN_NAME,
    has_plugin_nodes,
    make_plugin_node,
)
from runtimes.plugin_ops.onnxruntime_op import (
    ORT_DOMAIN,
    ORT_DOMAINS,
    prepare_for_onnxruntime,
    run_plugin_onnx,
)
from validation.compare import threshold_for

REPO = Path(__file__).resolve().parents[1]
GOLDEN_TOL = threshold_for("fp32").atol   # the fp32 graph (reference node) vs the golden PyTorch output
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _golden_cases() -> list[str]:
    return list(golden_index()) or ["missing-golden-data"]


def _clean_env() -> dict[str, str]:
    """Environment for subprocesses: repo importable, Triton compiled (not interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# -- golden cases: export once per case (conftest's artifacts cache, shared across modules) -----------------
def _export_case(name: str, golden_dir: Path, artifacts) -> dict:
    return golden_plugin_export(artifacts, golden_dir, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", _golden_cases())
def test_plugin_onnx_matches_golden_in_onnxruntime(name: str, golden_dir: Path, artifacts) -> None:
    if name == "missing-golden-data":
        pytest.skip("shared/golden/index.json is missing")
    case = _export_case(name, golden_dir, artifacts)
    report, io = case["report"], case["io"]
    proto = onnx.load(str(report.path))
    onnx.checker.check_model(proto, full_check=True)

    # Graph structure: attention only inside the plugin nodes, one per block.
    hist = {n.op_type for n in proto.graph.node}
    assert "Softmax" not in hist
    info = verify_plugin_graph(proto, n_blocks=case["n_blocks"], window=case["window"], heads=case["heads"])
    assert info.plugin_nodes == case["n_blocks"] and info.max_reshape_rank < 6
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["esc.attention"] == "plugin" and meta["esc.scale"] == str(case["scale"])

    got = run_plugin_onnx(proto, io["lr"].numpy())
    err = float(np.abs(got - io["sr"].numpy()).max())
    print(f"{name}: plugin graph in ONNX Runtime vs golden sr: max abs {err:.2e}")
    assert got.shape == tuple(io["sr"].shape)
    assert err <= GOLDEN_TOL, f"{name}: {err:.2e} > {GOLDEN_TOL}"


def test_plugin_node_layout(golden_dir: Path, artifacts) -> None:
    """The attribute layout TensorRT's parser binds: op_type, plugin_namespace, aot, window, heads."""
    case = _export_case(PLUGIN_CASE, golden_dir, artifacts)
    proto = onnx.load(str(case["report"].path))
    assert proto.ir_version == 10
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 18), (PLUGIN_DOMAIN, 1)}
    nodes = [n for n in proto.graph.node if n.op_type == PLUGIN_NAME]
    assert len(nodes) == case["n_blocks"] == 5
    assert len({n.name for n in nodes}) == len(nodes)
    initializers = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for i, node in enumerate(nodes):
        assert node.domain == PLUGIN_DOMAIN
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"window": 32, "heads": 4, NAMESPACE_ATTRIBUTE: b"esc", AOT_ATTRIBUTE: 1}
        assert initializers[node.input[1]] == (4, 63 * 63)
        assert node.input[1] == f"blocks.{i}.attn.relative_position_bias"
    # The qkv input comes from the block's to_qkv convolution, the output feeds to_out.
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = [n for n in proto.graph.node if nodes[0].output[0] in n.input]
    assert producers[nodes[0].input[0]].op_type == "Conv"
    assert [n.op_type for n in consumers] == ["Conv"]


def test_onnx_runner_loads_plugin_graph(golden_dir: Path, artifacts) -> None:
    """runtimes.onnx_runner runs the plugin-form file by path (its session-options hook registers the op)."""
    from runtimes.base import load

    case = _export_case(PLUGIN_CASE, golden_dir, artifacts)
    with load(str(case["report"].path)) as runner:
        assert runner.scale == 2 and runner.attention == "plugin"
        got = runner.infer(case["io"]["lr"])
    assert float((got - case["io"]["sr"]).abs().max()) <= GOLDEN_TOL


@pytest.mark.slow
def test_to_onnx_cli_plugin_attention(golden_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "light.onnx"
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_onnx.py"), "--weights",
                          str(golden_dir / "esc_light_x4_35x35_b1.pth"), "--attention", "plugin", "--shape", "35x35",
                          "--batch", "1", "-o", str(out)], capture_output=True, text=True, env=_clean_env(),
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "plugin" in run.stdout and "max abs" in run.stdout
    proto = onnx.load(str(out))
    assert verify_plugin_graph(proto, n_blocks=3, window=32, heads=4).plugin_nodes == 3
    io = torch.load(golden_dir / "esc_light_x4_35x35_b1.io.pt")
    assert float(np.abs(run_plugin_onnx(proto, io["lr"].numpy()) - io["sr"].numpy()).max()) <= GOLDEN_TOL


# -- the ONNX Runtime reference node on hand-built graphs -----------------------------------------------
def _tiny_plugin_model(window: int = 16, heads: int = 2, h: int = 21, w: int = 37, domain: str = PLUGIN_DOMAIN,
                       extra_nodes: list | None = None, table: np.ndarray | None = None) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    if table is None:
        table = rng.normal(0, 0.5, (heads, (2 * window - 1) ** 2)).astype(np.float32)
    node = make_plugin_node("qkv", "table", "attn", window, heads, aot=True, name="blocks.0.attn/window_attention",
                            domain=domain)
    nodes = [node] + (extra_nodes or [helper.make_node("Identity", ["attn"], ["out"])])
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 3 * 16 * heads, h, w])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 16 * heads, h, w])],
        initializer=[numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(domain, 1)])
    model.ir_version = 10
    return model


def test_reference_node_in_onnxruntime_both_domains(tmp_path: Path) -> None:
    window, heads, h, w = 16, 2, 21, 37
    model = _tiny_plugin_model(window, heads, h, w)
    onnx.checker.check_model(model, full_check=True)
    qkv = np.random.default_rng(1).normal(size=(1, 3 * 16 * heads, h, w)).astype(np.float32)
    table = numpy_helper.to_array(model.graph.initializer[0]).copy()
    want = window_attention_reference(torch.from_numpy(qkv), torch.from_numpy(table), window, heads).numpy()

    remapped = prepare_for_onnxruntime(model)
    assert [n.domain for n in remapped.graph.node if n.op_type == PLUGIN_NAME] == [ORT_DOMAIN]
    assert {o.domain for o in remapped.opset_import} == {"", ORT_DOMAIN}
    assert [n.domain for n in model.graph.node if n.op_type == PLUGIN_NAME] == [PLUGIN_DOMAIN]  # not modified
    assert has_plugin_nodes(model, ORT_DOMAINS) and has_plugin_nodes(remapped, ORT_DOMAINS)
    # The op *is* the reference function, so only float32 round-off separates them (not a parity threshold).
    np.testing.assert_allclose(run_plugin_onnx(model, qkv), want, atol=1e-6, rtol=0)

    # The unmodified file, by path, through the toolkit's one session factory (its options hook
    # registers esc::window_attention).
    import onnxruntime as ort

    from runtimes.onnx_runner import make_session
    from runtimes.plugin_ops.onnxruntime_op import session_options_hook

    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))
    session = make_session(str(path))
    np.testing.assert_allclose(session.run(None, {"qkv": qkv})[0], want, atol=1e-6, rtol=0)

    class Plain:
        proto = helper.make_model(helper.make_graph([], "empty", [], []))
        custom_domains: list[str] = []

    untouched = ort.SessionOptions()
    session_options_hook(untouched, Plain())   # no plugin node: nothing registered, nothing raised


def test_verify_plugin_graph_rejects_wrong_graphs() -> None:
    ok = _tiny_plugin_model()
    assert verify_plugin_graph(ok, n_blocks=1, window=16, heads=2).plugin_nodes == 1
    with pytest.raises(PluginExportError, match="expected one per block"):
        verify_plugin_graph(ok, n_blocks=2)
    with pytest.raises(PluginExportError, match="Softmax"):
        verify_plugin_graph(_tiny_plugin_model(extra_nodes=[helper.make_node("Softmax", ["attn"], ["out"])]))
    shape6 = numpy_helper.from_array(np.array([1, 2, 48, 21, 37, 1], np.int64), "shape6")
    reshape = _tiny_plugin_model(extra_nodes=[helper.make_node("Reshape", ["attn", "shape6"], ["out"])])
    reshape.graph.initializer.append(shape6)
    with pytest.raises(PluginExportError, match="rank-6"):
        verify_plugin_graph(reshape)
    with pytest.raises(PluginExportError, match="table shape"):
        verify_plugin_graph(_tiny_plugin_model(table=np.zeros((2, 10), np.float32)))
    missing = _tiny_plugin_model()
    del missing.graph.node[0].attribute[-1]   # drop "aot"
    with pytest.raises(PluginExportError, match="attributes"):
        verify_plugin_graph(missing)


# -- the command line without TensorRT --------------------------------------------------------------------
def _without_tensorrt(tmp_path: Path) -> Path:
    """A folder whose ``tensorrt`` package refuses to import: first on PYTHONPATH, TensorRT is absent."""
    blocker = tmp_path / "no-tensorrt" / "tensorrt"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("No module named \'tensorrt\' (hidden by the test)")\n')
    return blocker.parent


@pytest.mark.slow
def test_to_trt_without_tensorrt_writes_onnx_and_exits_2(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """TensorRT hidden (installed or not): the plugin-form ONNX is written, TensorRT is named, exit 2; --dry-run 0."""
    weights = window16_checkpoint(tiny_checkpoint, tmp_path)
    engine = tmp_path / "x.engine"
    env = _clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(_without_tensorrt(tmp_path)), env["PYTHONPATH"]])
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--weights", str(weights),
                          "-o", str(engine)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "TensorRT" in run.stderr and "pip install tensorrt" in run.stderr
    assert "Traceback" not in run.stderr
    onnx_files = sorted(tmp_path.glob("x.plugin.*.onnx"))
    assert len(onnx_files) == 1, list(tmp_path.iterdir())
    assert str(onnx_files[0]) in run.stderr
    proto = onnx.load(str(onnx_files[0]))
    onnx.checker.check_model(proto, full_check=True)
    info = verify_plugin_graph(proto, n_blocks=1, window=16, heads=1)
    assert info.aot
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob(".*.tmp"))

    # --dry-run: everything up to the build (the ONNX file is reused), exit 0.
    dry = subprocess.run([sys.executable, "-m", "export.to_trt", "--weights", str(weights), "-o", str(engine),
                          "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "reusing" in dry.stderr and "dry run" in dry.stdout
    assert "esc_window_attention compiled to PTX" in dry.stdout or not HAS_TRITON
    assert "8 parameters" in dry.stdout or not HAS_TRITON
    assert not list(tmp_path.glob("*.engine"))


def test_to_trt_rejects_bad_profile_before_loading() -> None:
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--model", "esc", "--min-shape",
                          "1x3x64x64", "--max-shape", "1x3x32x32"], capture_output=True, text=True,
                         env=_clean_env(), timeout=300)
    assert run.returncode == 2
    assert "error: profile height" in run.stderr and "Traceback" not in run.stderr


def test_engine_names_encode_what_they_were_built_for(tmp_path: Path) -> None:
    from export import trt_build as tb

    profile = tb.ShapeProfile.parse("1x3x16x16", "256x256", "4x3x512x512")
    assert profile.opt == (1, 3, 256, 256)
    tag = tb.engine_tag("fp16", "strong", "plugin", profile, "10.13.2", "NVIDIA H100 80GB HBM3", "ab" * 32)
    assert tag == "plugin_fp16_b1-4_16x16-512x512_opt1x256x256_trt10.13.2_nvidia-h100-80gb-hbm3_onnxababababab"
    other = tb.engine_tag("fp16", "strong", "plugin", profile, "10.14.0", "NVIDIA H100 80GB HBM3", "ab" * 32)
    assert other != tag
    engine = tb.engine_path_for(tmp_path / "x.engine", tag)
    assert engine.name == f"x.{tag}.engine"
    assert tb.onnx_path_for(tmp_path / "x.engine", "plugin", "fp16").name == "x.plugin.fp16.onnx"
    with pytest.raises(tb.TrtBuildError, match="3-channel"):
        tb.parse_shape_arg("1x4x8x8")
    assert tb.parse_shape_arg("lr:2x3x64x48") == (2, 3, 64, 48)


# -- the TensorRT plugin without TensorRT --------------------------------------------------------------
def test_launch_config_matches_the_triton_launcher() -> None:
    from runtimes.plugin_ops.tensorrt_plugin import launch_config

    for b, h, w in ((1, 1, 1), (2, 37, 53), (3, 64, 64), (1, 65, 33), (4, 200, 17)):
        grid, scalars = launch_config(b, h, w, 32, 4, 64)
        # models.kernels.window_attention_triton's grid and scalar arguments
        assert grid == (32 * 32 // 64, -(-h // 32) * -(-w // 32), b * 4)
        assert scalars == (h, w, max(2 * (h - 1), 1), max(2 * (w - 1), 1), -(-w // 32))


def _run_clean(code: str, extra_path: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = _clean_env()
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env["PYTHONPATH"]])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=timeout)


_ENTRY_IN_INTERPRETER = '''
import json, math
import torch
from runtimes.plugin_ops.tensorrt_plugin import HEAD_DIM, esc_window_attention, launch_config
from models.kernels.reference import window_attention_reference
import triton.language as tl

torch.manual_seed(0)
out = {}
for dtype, (b, h, w) in ((torch.float32, (1, 21, 37)), (torch.float16, (2, 16, 5))):
    window, heads, block_m, block_n = 16, 2, 64, 128
    qkv = torch.randn(b, 3 * HEAD_DIM * heads, h, w).to(dtype)
    table = (0.5 * torch.randn(heads, (2 * window - 1) ** 2)).to(dtype)
    result = torch.full((b, HEAD_DIM * heads, h, w), float("nan"), dtype=dtype)
    grid, scalars = launch_config(b, h, w, window, heads, block_m)   # what the AOT impl hands TensorRT
    esc_window_attention[grid](qkv, table, *scalars, result, HEADS=heads, WINDOW=window, HEAD_DIM=HEAD_DIM,
                               BLOCK_M=block_m, BLOCK_N=block_n, DOT_DTYPE=tl.float32,
                               QK_SCALE=HEAD_DIM ** -0.5 * math.log2(math.e), BIAS_SCALE=math.log2(math.e))
    want = window_attention_reference(qkv, table, window, heads)
    out[str(dtype)] = float((result.float() - want.float()).abs().max())
print(json.dumps(out))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_aot_entry_kernel_with_aot_launch_config_in_interpreter() -> None:
    """The AOT entry kernel, launched with the grid and int32 scalars the AOT impl gives TensorRT, is exact.

    Runs in Triton's CPU interpreter (a fresh process with TRITON_INTERPRET=1), so the
    argument order (inputs, scalars, output) and the launch arithmetic are checked
    against the reference without a GPU.
    """
    env = _clean_env()
    env["TRITON_INTERPRET"] = "1"
    run = subprocess.run([sys.executable, "-c", _ENTRY_IN_INTERPRETER], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    errors = json.loads(run.stdout.strip().splitlines()[-1])
    # The one tolerance table (validation.compare.THRESHOLDS) for each precision.
    assert errors["torch.float32"] <= threshold_for("fp32").atol, errors
    assert errors["torch.float16"] <= threshold_for("fp16").atol, errors


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_compile_ptx_without_gpu() -> None:
    """The AOT entry kernel compiles to PTX for sm_90 here (fresh process: Triton not interpreted)."""
    code = textwrap.dedent('''
        import json, re
        from runtimes.plugin_ops.tensorrt_plugin import ENTRY_NAME, compile_ptx
        out = {}
        for dtype in ("fp16", "fp32"):
            ptx = compile_ptx(dtype, 32, 4, target="cuda:90")
            out[dtype] = {"entry": bool(re.search(r"\\.entry\\s+" + ENTRY_NAME + r"\\s*\\(", ptx)),
                          "target": re.search(r"\\.target\\s+(\\S+)", ptx).group(1), "chars": len(ptx)}
        ptx84 = compile_ptx("fp16", 32, 4, target="sm_80", ptx_version=80)
        out["ptx80"] = re.search(r"\\.version\\s+(\\S+)", ptx84).group(1)
        print(json.dumps(out))
    ''')
    run = _run_clean(code)
    # A ptxas error is a failure, not a skip: Triton ships its own ptxas, which runs without a GPU.
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for dtype in ("fp16", "fp32"):
        assert out[dtype]["entry"], f"{dtype}: PTX has no .entry esc_window_attention"
        assert out[dtype]["target"].startswith("sm_90")
    assert out["ptx80"] == "8.0"


# -- the runner ----------------------------------------------------------------------------------------
def test_trt_runner_without_tensorrt_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtimes.base import RunnerError, load, runner_class_for
    from runtimes.trt_runner import TensorRTRunner

    monkeypatch.setitem(sys.modules, "tensorrt", None)   # TensorRT absent, installed or not

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine")
    assert runner_class_for(str(engine)) is TensorRTRunner
    assert runner_class_for(str(tmp_path / "model.plan")) is TensorRTRunner
    with pytest.raises(RunnerError, match=r"TensorRT is not installed.*pip install tensorrt"):
        TensorRTRunner(engine)
    with pytest.raises(RunnerError, match="TensorRT"):
        load(str(engine), device="cuda")
    with pytest.raises(RunnerError, match="no such TensorRT engine"):
        TensorRTRunner(tmp_path / "missing.engine")


# -- a real engine (GPU + TensorRT) --------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (pip install tensorrt-cu12)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_engine_matches_golden(precision: str, golden_dir: Path, tmp_path: Path) -> None:
    from export import to_trt
    from runtimes.trt_runner import TensorRTRunner

    name = "esc_light_x4_35x35_b1"
    status = to_trt.main(["--weights", str(golden_dir / f"{name}.pth"), "--precision", precision,
                          "--min-shape", "1x3x16x16", "--opt-shape", "1x3x64x64", "--max-shape", "2x3x128x128",
                          "--iterations", "3", "-o", str(tmp_path / "light.engine")])
    assert status == 0
    engines = sorted(tmp_path.glob("light.*.engine"))
    assert len(engines) == 1
    io = torch.load(golden_dir / f"{name}.io.pt")
    with TensorRTRunner(engines[0]) as runner:
        assert runner.scale == 4
        got = runner.infer(io["lr"].cuda()).cpu()
        big = runner.upscale(torch.rand(1, 3, 150, 140))   # beyond the profile: tiled
    assert big.shape == (1, 3, 600, 560)
    err = float((got - io["sr"]).abs().max())
    assert err <= threshold_for(precision).atol, err
    # A second run reuses the engine (exact name match) instead of building.
    assert to_trt.main(["--weights", str(golden_dir / f"{name}.pth"), "--precision", precision,
                        "--min-shape", "1x3x16x16", "--opt-shape", "1x3x64x64", "--max-shape", "2x3x128x128",
                        "--iterations", "3", "-o", str(tmp_path / "light.engine")]) == 0
    assert sorted(tmp_path.glob("light.*.engine")) == engines


# -- what a real TensorRT / an older toolchain would reject (issue 12) ---------------------------------------
_OLD_TRITON_PROBE = '''
import json
out = {}
try:
    import models.kernels.window_attention_triton
    out["kernel"] = "imported"
except ImportError as exc:
    out["kernel"] = f"{type(exc).__name__}: {exc}"
from runtimes.plugin_ops import tensorrt_plugin
try:
    tensorrt_plugin.compile_kernel("fp16", 32, 4)
    out["compile"] = "compiled"
except RuntimeError as exc:
    out["compile"] = str(exc)
print(json.dumps(out))
'''


def test_old_triton_is_refused_with_the_documented_message(tmp_path: Path) -> None:
    """Triton < 3.4 (no triton.knobs): the kernel import and the AOT compile name the floor, no AttributeError."""
    from models.kernels.triton_support import (
        MIN_TRITON,
        TritonVersionError,
        require_triton,
        triton_too_old_message,
    )

    assert MIN_TRITON == (3, 4)
    assert triton_too_old_message("3.4.0") is None and triton_too_old_message("3.9.0+git1a2b") is None
    with pytest.raises(TritonVersionError, match=r"Triton 3\.1\.0 is too old .* triton >= 3\.4"):
        require_triton("3.1.0")

    stub = tmp_path / "old" / "triton"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('__version__ = "3.1.0"\n')   # no knobs, like Triton 3.1
    (stub / "language.py").write_text("float16 = bfloat16 = float32 = object()\n")
    run = _run_clean(_OLD_TRITON_PROBE, extra_path=stub.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["kernel"].startswith("TritonVersionError: Triton 3.1.0 is too old"), out
    assert "pip install -U 'triton>=3.4'" in out["compile"], out
    assert "AttributeError" not in run.stdout + run.stderr


def test_environment_gates_name_the_versions() -> None:
    """Native attention needs TensorRT >= 10.14; the plugin path an up-to-date Triton."""
    from export import trt_build as tb

    ready = dict(tensorrt_version="10.14.1", has_plugin_api=True, has_aot=True, cuda=True, gpu_name="H200",
                 compute_capability="90", triton_version="3.9.0")
    assert tb.Environment(**ready).missing("native") == [] and tb.Environment(**ready).missing("plugin") == []
    old = tb.Environment(**{**ready, "tensorrt_version": "10.13.2"})
    assert old.missing("native") == [tb.native_attention_too_old("10.13.2")]
    assert "ONNX parser supports it from TensorRT 10.14" in old.missing("native")[0]
    assert "Plugin not found" in old.missing("native")[0]
    assert old.missing("plugin") == []   # 10.13 has tensorrt.plugin with aot_impl
    stale = tb.Environment(**{**ready, "triton_version": "3.2.0", "triton_error": tb.triton_too_old_message("3.2.0")})
    assert any("Triton 3.2.0 is too old" in m for m in stale.missing("plugin"))
    assert stale.missing("native") == []   # the native path does not compile the kernel


def test_probe_environment_reads_the_triton_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    import triton

    from export import trt_build as tb

    monkeypatch.setattr(triton, "__version__", "3.3.1")
    env = tb.probe_environment()
    assert env.triton_version == "3.3.1" and "too old" in (env.triton_error or "")
    assert any("Triton 3.3.1 is too old" in m for m in env.missing("plugin"))


@pytest.fixture(scope="module")
def trt_1013() -> StubAPI:
    """TensorRT 10.13's Python API from its stubs (plus the 10.14+ IAttention classes)."""
    return tensorrt_api_or_skip()


def test_parsed_attention_layers_are_marked_decomposable(trt_1013: StubAPI) -> None:
    """On a pybind11-like network (fresh base-class wrappers per call), every IAttention is marked once.

    The old code read ``.attention`` off ``get_layer(i)`` uncast and marked none (returned 0).
    """
    from export import trt_build as tb

    trt, fake = fake_tensorrt(trt_1013)
    layers = parsed_network(fake, 3)
    network = trt.Builder(trt.Logger()).create_network(0)
    assert network.get_layer(1) is not network.get_layer(1)     # a new wrapper per call
    with pytest.raises(AttributeError):
        network.get_layer(1).attention                           # the base ILayer until cast
    assert tb.mark_attention_decomposable(network, trt) == 3
    assert all(layer["_attention"]["decomposable"] for layer in layers[1:])


def test_native_marking_refuses_a_network_without_attention(trt_1013: StubAPI) -> None:
    """One IAttention is marked (the gate's edge); none is a build error naming the fix, not a silent 0."""
    from export import trt_build as tb

    trt, fake = fake_tensorrt(trt_1013)
    parsed_network(fake, 1)
    assert tb.mark_attention_decomposable(trt.Builder(trt.Logger()).create_network(0), trt) == 1
    trt, fake = fake_tensorrt(trt_1013)
    parsed_network(fake, 0)
    with pytest.raises(tb.TrtBuildError, match=r"holds no IAttention .*\(--reexport\) or use --attention plugin"):
        tb.mark_attention_decomposable(trt.Builder(trt.Logger()).create_network(0), trt)


def test_summary_states_the_softmax_precision() -> None:
    from export import trt_build as tb

    assert "ignores softmax_precision" in tb.softmax_precision("native", "fp16")
    assert tb.softmax_precision("native", "fp32") == "fp32"
    assert tb.softmax_precision("plugin", "fp16").startswith("fp32")


def test_profile_launch_limit() -> None:
    """CUDA's 65535 on grid y (windows) and z (batch x heads), checked on the profile's max shape."""
    from export import trt_build as tb

    tb.ShapeProfile.parse(None, None, "1x3x8160x8160").check_kernel_launch(32, 4)   # 255 x 255 windows
    tb.ShapeProfile.parse(None, None, "1x3x8160x8192").check_kernel_launch(32, 4)   # 255 x 256 = 65280
    with pytest.raises(tb.TrtBuildError, match=r"65536 windows .* largest allowed size is 8192x8160 .* 8160x8160"):
        tb.ShapeProfile.parse(None, None, "8192x8192").check_kernel_launch(32, 4)
    with pytest.raises(tb.TrtBuildError, match=r"batch 16384 x 4 heads = 65536 .* largest allowed batch is 16383"):
        tb.ShapeProfile.parse(None, None, "16384x3x64x64").check_kernel_launch(32, 4)


def test_to_trt_rejects_too_large_max_shape_before_any_work(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--model", "esc", "--max-shape",
                          "8192x8192", "-o", str(tmp_path / "x.engine")], capture_output=True, text=True,
                         env=_clean_env(), cwd=tmp_path, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: --max-shape 1x3x8192x8192 is too large" in run.stderr
    assert "8160x8160" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []   # nothing exported, nothing built


def test_profile_shorthand_is_width_by_height() -> None:
    from export import trt_build as tb

    assert tb.parse_shape_arg("1280x720") == (1, 3, 720, 1280)       # runtimes.cli_args.parse_size
    assert tb.parse_shape_arg("2x3x720x1280") == (2, 3, 720, 1280)   # TensorRT's NxCxHxW
    with pytest.raises(tb.TrtBuildError, match="WIDTHxHEIGHT"):
        tb.parse_shape_arg("1280x")
    with pytest.raises(tb.TrtBuildError, match="NxCxHxW"):
        tb.parse_shape_arg("1x3x720")
    help_text = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--help"], capture_output=True,
                               text=True, env=_clean_env(), timeout=120).stdout
    assert "WIDTHxHEIGHT" in help_text and "Examples" in help_text and "--max-shape 640x360" in help_text


_DRY_RUN_PTX_PROBE = '''
import json, re, sys
import onnx
import tensorrt as trt
import trt_qdp_driver as driver
from runtimes.plugin_ops import tensorrt_plugin
from runtimes.metadata import ArtifactMetadata
from export.to_trt import dry_run_kernel

tensorrt_plugin.driver_ptx_version = lambda: 80   # an older driver: PTX ISA 8.0 at most
tensorrt_plugin.register_plugin()                 # what the build does (no --ptx-target / --ptx-version)
node = onnx.load(sys.argv[1]).graph.node[0]
plugin, _ = driver.parse_node(node, "op_type")
build_ptx = driver.build(plugin, trt.DataType.HALF, trt.DataType.HALF, 192, (4, 63 * 63))["ptx"]
meta = ArtifactMetadata(precision="fp16", extra={"plugin_window": "32", "plugin_heads": "4"})
kernel, target = dry_run_kernel(meta, None, None)
dry_ptx = tensorrt_plugin.aot_ptx(kernel)
uncapped = tensorrt_plugin.compile_ptx("fp16", 32, 4, target=target)
version = lambda ptx: re.search(r"\\.version\\s+(\\S+)", ptx).group(1)
print(json.dumps({"same": dry_ptx == build_ptx, "build": version(build_ptx), "dry": version(dry_ptx),
                  "uncapped": version(uncapped), "target": target}))
'''


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_dry_run_ptx_is_what_the_build_embeds(artifacts, tmp_path: Path) -> None:
    """Same target and driver PTX cap: the dry run's PTX is what TensorRT 11.4's real plugin path gets."""
    stage = trt_real.staged("11.4", artifacts)
    table = np.zeros((4, 63 * 63), np.float16)
    graph = helper.make_graph([make_plugin_node("qkv", "table", "out", 32, 4, name="blocks.0.attn/window_attention")],
                              "one", [helper.make_tensor_value_info("qkv", TensorProto.FLOAT16, ["b", 192, "h", "w"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["b", 64, "h", "w"])],
                              initializer=[numpy_helper.from_array(table, "table")])
    path = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph), str(path))
    env = _clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(stage), env["PYTHONPATH"], str(REPO / "tests")])
    run = subprocess.run([sys.executable, "-c", _DRY_RUN_PTX_PROBE, str(path)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["same"], out
    assert out["build"] == out["dry"] == "8.0", out
    assert out["uncapped"] != "8.0", out   # without the cap the dry run would report another kernel
    assert out["target"] == "cuda:90"


def test_failed_plugin_registration_is_carried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The original error is raised (chained) now and on later calls, and names the engine-load failure."""
    from types import SimpleNamespace

    from runtimes.base import RunnerError
    from runtimes.plugin_ops import tensorrt_plugin as tp
    from runtimes.trt_runner import deserialize_engine

    cause = RuntimeError("aot_impl: tensorrt.plugin rejected the signature")

    def fail(plugin_id):
        raise cause

    identity = lambda plugin_id, **options: (lambda fn: fn)   # noqa: E731
    trtp = SimpleNamespace(register=identity, impl=identity, aot_impl=fail, TensorDesc=object,
                           KernelLaunchParams=object, SymIntExprs=object)
    monkeypatch.setattr(tp, "import_tensorrt", lambda: (SimpleNamespace(__version__="10.13.0"), trtp))
    monkeypatch.setattr(tp, "_STATE", {**tp._STATE, "registered": False, "aot": False, "error": None})
    monkeypatch.setattr(tp, "driver_ptx_version", lambda: None)
    for _ in range(2):   # the second call must not retry (double registration) nor hide the cause
        with pytest.raises(tp.PluginRegistrationError, match="rejected the signature") as info:
            tp.register_plugin(target="cuda:90")
        assert info.value.__cause__ is cause
    assert not tp.plugin_registered()

    engine = tmp_path / "x.engine"
    engine.write_bytes(b"serialized")
    refusing = SimpleNamespace(deserialize_cuda_engine=lambda data: None)
    build = {"tensorrt_version": "10.13.0", "gpu": "NVIDIA H200"}
    with pytest.raises(RunnerError, match="plugin could not be registered.*rejected the signature") as info:
        deserialize_engine(refusing, str(engine), "10.13.0", build, cause)
    assert info.value.__cause__ is cause
    with pytest.raises(RunnerError, match="built for") as info:
        deserialize_engine(refusing, str(engine), "10.14.0", build, None)
    assert "could not be registered" not in str(info.value)
    loaded = object()
    assert deserialize_engine(SimpleNamespace(deserialize_cuda_engine=lambda data: loaded), str(engine), "10.13.0",
                              build, cause) is loaded


def test_parity_gate_fails_on_a_corrupted_artifact(golden_dir: Path, artifacts, tmp_path: Path) -> None:
    """to_trt's gate (the one threshold table): a corrupted ONNX constant fails it, the intact file passes.

    TensorRT is absent here, so the gate runs the plugin-form ONNX (what the engine is
    built from) through runtimes.load (ONNX Runtime, reference plugin op); on a GPU
    machine the same function gates the engine.
    """
    from export.to_trt import parity_gate
    from models import load_model

    case = _export_case(PLUGIN_CASE, golden_dir, artifacts)
    reference = load_model(golden_dir / "esc_x2_37x53_b1.pth", attention="sdpa").eval()
    images = [case["io"]["lr"]]
    rows, ok = parity_gate(case["report"].path, reference, images, "fp32", device="cpu")
    assert ok and "FAILED" not in rows[0][1]

    proto = onnx.load(str(case["report"].path))
    table = next(t for t in proto.graph.initializer if t.name.endswith("relative_position_bias"))
    corrupted = numpy_helper.to_array(table).copy()
    corrupted[:, : corrupted.shape[1] // 2] += 0.5   # one block's bias table, half of it off by 0.5
    table.CopyFrom(numpy_helper.from_array(corrupted, table.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    rows, ok = parity_gate(broken, reference, images, "fp32", device="cpu")
    assert not ok and "FAILED (needs max abs error <= 0.0001)" in rows[0][1]


@pytest.mark.slow
def test_to_trt_native_attention_gate_message(tiny_checkpoint: Path, artifacts, tmp_path: Path) -> None:
    """Under TensorRT 10.13 (its real tensorrt.plugin, shimmed core), --attention native prints the 10.14 gate, exit 2."""
    stage = trt_real.staged("10.13", artifacts)
    env = _clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(stage), env["PYTHONPATH"]])
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--weights", str(tiny_checkpoint),
                          "--attention", "native", "--precision", "fp32", "-o", str(tmp_path / "n.engine")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert run.returncode == 2, run.stderr[-3000:]
    version = trt_real.BINDINGS["10.13"].version
    assert f"missing: TensorRT {version} cannot parse the ONNX Attention op (opset 23)" in run.stderr
    assert "from TensorRT 10.14" in run.stderr and "Traceback" not in run.stderr


def test_bias_free_models_are_refused_the_plugin_form(tmp_path: Path) -> None:
    """ESC-RIB/SST attention has no bias table for the plugin: the refusal names the native path, before any export."""
    import warnings

    from export.trt_build import TrtBuildError, export_for_trt
    from models import create_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = create_model("esc_rib", 4)
    with pytest.raises(TrtBuildError, match="--attention native"):
        export_for_trt(model, tmp_path / "rib.engine", attention="plugin", precision="fp32")
    assert not list(tmp_path.iterdir())  # nothing written
