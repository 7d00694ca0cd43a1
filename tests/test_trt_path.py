"""The TensorRT path: plugin-form ONNX, its ONNX Runtime reference, the TensorRT plugin, CLI, runner.

Without TensorRT and a GPU (the CI machines) this checks everything up to the engine:

* every golden checkpoint exported in plugin form (static golden size, batch 1: export
  is ~20-45 s per model here) runs in ONNX Runtime CPU through the reference node and
  reproduces the golden ``sr`` within the fp32 parity threshold (``threshold_for("fp32")``);
* the graph: no Softmax, no Reshape to rank >= 6, one plugin node per block with the
  attribute layout TensorRT's ONNX parser needs, the table as an initializer;
* ``export/to_trt.py`` writes a valid plugin-form ONNX, names TensorRT as missing and
  exits 2; ``--dry-run`` exits 0;
* the AOT kernel compiles to PTX for sm_90 without a GPU, and the plugin's registration
  code runs against a stand-in ``tensorrt.plugin`` that checks the documented schemas;
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
from onnx import TensorProto, helper, numpy_helper

from export.plugin_onnx import PluginExportError, export_plugin_onnx, verify_plugin_graph
from models.kernels.reference import window_attention_reference
from runtimes.plugin_ops.contract import (
    AOT_ATTRIBUTE,
    NAMESPACE_ATTRIBUTE,
    PLUGIN_DOMAIN,
    PLUGIN_NAME,
    has_plugin_nodes,
    make_plugin_node,
)
from runtimes.plugin_ops.onnxruntime_op import ORT_DOMAIN, ORT_DOMAINS, prepare_for_onnxruntime, run_plugin_onnx
from validation.compare import threshold_for

REPO = Path(__file__).resolve().parents[1]
GOLDEN_TOL = threshold_for("fp32").atol   # the fp32 graph (reference node) vs the golden PyTorch output
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _golden_cases() -> list[str]:
    index = REPO.parent / "shared" / "golden" / "index.json"
    if not index.is_file():
        return ["missing-golden-data"]
    return [entry["name"] for entry in json.loads(index.read_text())]


def _clean_env() -> dict[str, str]:
    """Environment for subprocesses: repo importable, Triton compiled (not interpreted)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# -- golden cases: export once per case ---------------------------------------------------------------
@pytest.fixture(scope="module")
def plugin_exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"dir": tmp_path_factory.mktemp("plugin_onnx")}


def _export_case(name: str, golden_dir: Path, cache: dict) -> dict:
    if name in cache:
        return cache[name]
    from models import load_model

    model = load_model(golden_dir / f"{name}.pth", attention="sdpa")
    io = torch.load(golden_dir / f"{name}.io.pt")
    h, w = io["lr"].shape[-2:]
    report = export_plugin_onnx(model, cache["dir"] / f"{name}.onnx", shape=(h, w), batch=1, check_parity=False)
    attn = model.attention_modules()
    cache[name] = {"report": report, "io": io, "n_blocks": len(attn), "window": attn[0].window,
                   "heads": attn[0].heads, "scale": model.scale}
    return cache[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", _golden_cases())
def test_plugin_onnx_matches_golden_in_onnxruntime(name: str, golden_dir: Path, plugin_exports: dict) -> None:
    if name == "missing-golden-data":
        pytest.skip("shared/golden/index.json is missing")
    case = _export_case(name, golden_dir, plugin_exports)
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


def test_plugin_node_layout(golden_dir: Path, plugin_exports: dict) -> None:
    """The attribute layout TensorRT's parser binds: op_type, plugin_namespace, aot, window, heads."""
    case = _export_case("esc_x2_37x53_b1", golden_dir, plugin_exports)
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


def test_onnx_runner_loads_plugin_graph(golden_dir: Path, plugin_exports: dict) -> None:
    """runtimes.onnx_runner runs the plugin-form file by path (its session-options hook registers the op)."""
    from runtimes.base import load

    case = _export_case("esc_x2_37x53_b1", golden_dir, plugin_exports)
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

    # The unmodified file, by path, through the session-options hook (esc::window_attention registration).
    import onnxruntime as ort

    from runtimes.plugin_ops.onnxruntime_op import session_options_hook

    path = tmp_path / "tiny.onnx"
    onnx.save(model, str(path))

    class Info:  # what runtimes.onnx_runner.OnnxModelInfo offers a hook
        proto = model
        custom_domains = [PLUGIN_DOMAIN]

    options = ort.SessionOptions()
    session_options_hook(options, Info())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
@pytest.mark.slow
@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here: the build itself is covered by the gpu test")
def test_to_trt_without_tensorrt_writes_onnx_and_exits_2(golden_dir: Path, tmp_path: Path) -> None:
    weights = golden_dir / "esc_x2_37x53_b1.pth"
    engine = tmp_path / "x.engine"
    run = subprocess.run([sys.executable, str(REPO / "export" / "to_trt.py"), "--weights", str(weights),
                          "-o", str(engine)], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path,
                         timeout=900)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "TensorRT" in run.stderr and "pip install tensorrt" in run.stderr
    assert "Traceback" not in run.stderr
    onnx_files = sorted(tmp_path.glob("x.plugin.*.onnx"))
    assert len(onnx_files) == 1, list(tmp_path.iterdir())
    assert str(onnx_files[0]) in run.stderr
    proto = onnx.load(str(onnx_files[0]))
    onnx.checker.check_model(proto, full_check=True)
    info = verify_plugin_graph(proto, n_blocks=5, window=32, heads=4)
    assert info.aot
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob(".*.tmp"))

    # --dry-run: everything up to the build (the ONNX file is reused), exit 0.
    dry = subprocess.run([sys.executable, "-m", "export.to_trt", "--weights", str(weights), "-o", str(engine),
                          "--dry-run"], capture_output=True, text=True, env=_clean_env(), cwd=REPO, timeout=900)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "reusing" in dry.stderr and "dry run" in dry.stdout
    assert "esc_window_attention compiled to PTX" in dry.stdout or not HAS_TRITON
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


_TRT_STUB = '''
"""Stand-in for tensorrt / tensorrt.plugin that checks the documented QDP schemas."""
__version__ = "10.99.0-stub"


class DataType:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "DataType." + self.name

    __str__ = __repr__


float32, float16, bfloat16 = DataType("FLOAT"), DataType("HALF"), DataType("BF16")
'''

_TRTP_STUB = '''
import builtins
import inspect
import typing

REGISTRY = {}


class TensorDesc:
    def __init__(self, shape_expr=None, dtype=None):
        self.shape_expr, self.dtype = shape_expr, dtype


class Tensor:
    pass


class KernelLaunchParams:
    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class SymExprs:
    def __init__(self, n):
        self._exprs = [None] * n

    def __setitem__(self, i, v):
        self._exprs[i] = v

    def __getitem__(self, i):
        return self._exprs[i]

    def __len__(self):
        return len(self._exprs)


class SymIntExprs(SymExprs):
    pass


class SymInt32:
    def __init__(self, value):
        self.value = value


def from_shape_expr(shape, dtype):
    return TensorDesc(tuple(shape), dtype)


def cdiv(a, b):
    return -(-a // b)


def max(a, b):
    return builtins.max(a, b)


def register(plugin_id):
    def deco(fn):
        sig = inspect.signature(fn)
        for name, p in sig.parameters.items():
            assert p.annotation is not inspect.Parameter.empty, f"register: {name} has no annotation"
            assert p.annotation is TensorDesc or p.annotation in (int, float, str, bool, bytes), name
        assert sig.return_annotation is TensorDesc
        tensors = [n for n, p in sig.parameters.items() if p.annotation is TensorDesc]
        attrs = [n for n, p in sig.parameters.items() if p.annotation is not TensorDesc]
        REGISTRY[plugin_id] = {"register": fn, "tensors": tensors, "attrs": attrs}
        return fn
    return deco


def impl(plugin_id):
    def deco(fn):
        d = REGISTRY[plugin_id]
        names = list(inspect.signature(fn).parameters)
        assert names == d["tensors"] + d["attrs"] + ["outputs", "stream"], names
        d["impl"] = fn
        return fn
    return deco


def aot_impl(plugin_id):
    def deco(fn):
        d = REGISTRY[plugin_id]
        sig = inspect.signature(fn)
        assert list(sig.parameters) == d["tensors"] + d["attrs"] + ["outputs", "tactic"], list(sig.parameters)
        ret = sig.return_annotation
        assert typing.get_origin(ret) is tuple, ret
        args = typing.get_args(ret)
        assert len(args) == 4 and args[2] is KernelLaunchParams and issubclass(args[3], SymExprs), ret
        d["aot_impl"] = fn
        return fn
    return deco
'''

_PLUGIN_PROBE = '''
import json, re, sys
import tensorrt
import tensorrt.plugin as trtp
from runtimes.plugin_ops import tensorrt_plugin

info = tensorrt_plugin.register_plugin(target="cuda:90")
entry = trtp.REGISTRY["esc::window_attention"]
result = {"info": {k: info[k] for k in ("registered", "aot", "target")}}
for dtype in (tensorrt.float16, tensorrt.float32):
    qkv = trtp.TensorDesc((2, 192, 37, 53), dtype)
    table = trtp.TensorDesc((4, 63 * 63), dtype)
    out = entry["register"](qkv, table, 32, 4)
    name, ptx, params, extra = entry["aot_impl"](qkv, table, 32, 4, (out,), 0)
    params_decl = re.search(r"\\.entry\\s+(\\w+)\\s*\\((.*?)\\)", ptx, re.S)
    result[str(dtype)] = {
        "out_shape": list(out.shape_expr), "out_dtype": str(out.dtype), "name": name,
        "entry": params_decl.group(1), "params": re.findall(r"\\.param\\s+\\.(\\w+)", params_decl.group(2)),
        "target": re.search(r"\\.target\\s+(\\S+)", ptx).group(1),
        "grid": [params.grid_x, params.grid_y, params.grid_z], "block": params.block_x,
        "shared": params.shared_mem, "scalars": [e.value for e in extra],
    }
print(json.dumps(result))
'''


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
    # Kernel bounds (the Triton kernel's own numerics against the reference, as in test_fused_kernel.py).
    assert errors["torch.float32"] <= 1e-5, errors
    assert errors["torch.float16"] <= 2e-3, errors


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
    if run.returncode != 0 and ("ptxas" in run.stderr.lower() or "no cuda" in run.stderr.lower()):
        pytest.skip(f"Triton cannot compile for sm_90 without a GPU here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for dtype in ("fp16", "fp32"):
        assert out[dtype]["entry"], f"{dtype}: PTX has no .entry esc_window_attention"
        assert out[dtype]["target"].startswith("sm_90")
    assert out["ptx80"] == "8.0"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the stand-in would shadow it")
def test_plugin_registration_against_documented_schema(tmp_path: Path) -> None:
    """register/impl/aot_impl signatures, shape and type inference, AOT launch parameters (stand-in TensorRT)."""
    stub = tmp_path / "stub" / "tensorrt"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(_TRT_STUB)
    (stub / "plugin.py").write_text(_TRTP_STUB)
    run = _run_clean(_PLUGIN_PROBE, extra_path=stub.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["info"] == {"registered": True, "aot": True, "target": "cuda:90"}
    for dtype in ("DataType.HALF", "DataType.FLOAT"):
        r = out[dtype]
        assert r["out_shape"] == [2, 64, 37, 53] and r["out_dtype"] == dtype
        assert r["name"] == r["entry"] == "esc_window_attention"
        assert r["target"].startswith("sm_90")
        # inputs, int32 scalars, output; then Triton's two hidden scratch pointers (never read)
        assert r["params"][:8] == ["u64", "u64", "u32", "u32", "u32", "u32", "u32", "u64"]
        assert r["grid"] == [16, 4, 8] and r["block"] == 128
        assert 0 < r["shared"] <= 48 * 1024
        assert r["scalars"] == [37, 53, 72, 104, 2]


# -- the runner ----------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_trt_runner_without_tensorrt_says_what_to_install(tmp_path: Path) -> None:
    from runtimes.base import RunnerError, load, runner_class_for
    from runtimes.trt_runner import TensorRTRunner

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
