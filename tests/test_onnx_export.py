"""ONNX export (export/onnx_export.py, export/to_onnx.py, export/common.py).

Every golden case is exported once (fp32, opset 18, dynamic batch/height/width) and run in
ONNX Runtime CPU at its golden input size and at a second size and batch the export never
saw; esc x2 and esc_fp are also exported at opset 23 (one native ``Attention`` per block).
Outputs must match the PyTorch model and the golden ``sr`` within 1e-4.

Exports are the slow part (torch.export plus the exporter's decomposition pass: tens of
seconds per model on 2 cores), so each artifact is made once per run through the shared
artifact cache (``conftest.artifacts``), and five of them (esc x2/x3/x4, esc_light and
esc_real, opset 18) are made by the command line in the cache's background worker while
this process exports the others (esc_fp at opsets 18 and 23 from one trace, esc x2 at
opset 23, esc_light in fp16): the CLI test, those golden cases and every module using
``golden_onnx`` (the esc_light CLI export) share them.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SHARED_DIR, ArtifactCache, cli_onnx, golden_index
import torch

from export import common
from export import onnx_export as ox
from runtimes.onnx_runner import make_session
from validation.compare import compare, threshold_for

REPO = Path(__file__).resolve().parents[1]
GOLDEN = SHARED_DIR / "golden"
CASES = golden_index()
CLI_X2 = "esc_x2_37x53_b1"
# Exported by `python export/to_onnx.py` in a background process (longest first after x2).
CLI_CASES = [name for name in (CLI_X2, "esc_real_x4_36x44_b1", "esc_x3_40x33_b1", "esc_x4_48x64_b1",
                               "esc_light_x4_35x35_b1") if name in CASES]
OPSET23_CASES = [name for name in (CLI_X2, "esc_fp_x4_41x47_b1") if name in CASES]
FP16_CASE = "esc_light_x4_35x35_b1"
# Cases this process exports come first, so they run while the background CLI works.
# esc x3/x4 and esc_real repeat what the others cover (another scale, more blocks) and
# cost the most: marked slow, so `-m "not slow"` skips them and their exports.
SLOW_CASES = ("esc_x3_40x33_b1", "esc_x4_48x64_b1", "esc_real_x4_36x44_b1")
GOLDEN_PARAMS = [
    pytest.param(name, opset, id=f"{name}-op{opset}", marks=[pytest.mark.slow] if name in SLOW_CASES else [])
    for name, opset in ([(n, 18) for n in CASES if n not in CLI_CASES] + [(n, 23) for n in OPSET23_CASES]
                        + [(n, 18) for n in CLI_CASES])
]

ATOL = 1e-4                 # ONNX Runtime vs PyTorch, and vs the golden sr
SECOND_SIZE = (2, 3, 21, 66)  # batch 2, one window tall, three wide: unseen by trace (2x39x51) and probe (1x27x45)
# fp16 graph with float32 I/O vs the fp32 PyTorch model, on the golden input. Measured
# (ONNX Runtime CPU): esc_light x4 max 2.65e-3, mean 4.5e-4. fp16 keeps 11 significant
# bits (relative 4.9e-4 per rounding); LayerNorm statistics, the global pools and the
# softmax stay fp32 (checked below). Bound with ~4x margin:
FP16_MAX_ABS = 1e-2
FP16_MEAN_ABS = 2e-3

pytestmark = pytest.mark.skipif(not CASES, reason=f"missing shared data: {GOLDEN / 'index.json'}")


# -- fixtures -------------------------------------------------------------------------------------
class Exports:
    """This module's golden exports, through the run's shared :class:`conftest.ArtifactCache`:
    CLI exports (the default, opset 18: built once, shared with ``golden_onnx``'s users) and
    exports made here (opset 18 and 23 of one model share its trace)."""

    def __init__(self, artifacts: ArtifactCache) -> None:
        self.artifacts = artifacts

    def _loaded(self, name: str) -> tuple[torch.nn.Module, dict]:
        from models import load_model

        model = load_model(GOLDEN / f"{name}.pth", attention="sdpa")
        return model, _model_state(model)

    def model(self, name: str) -> torch.nn.Module:
        return self.artifacts.get(("golden-model", name), lambda: self._loaded(name))[0]

    def before_export(self, name: str) -> dict:
        """The model's state when it was loaded (before any export touched it)."""
        return self.artifacts.get(("golden-model", name), lambda: self._loaded(name))[1]

    def submit_cli(self, name: str) -> None:
        cli_onnx(self.artifacts, GOLDEN / f"{name}.pth", background=True)

    def cli(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        return cli_onnx(self.artifacts, GOLDEN / f"{name}.pth")

    def artifact(self, name: str, opset: int) -> Path:
        if opset == 18 and name in CLI_CASES:
            result, path = self.cli(name)
            assert result.returncode == 0, f"CLI export of {name} failed:\n{result.stderr[-3000:]}"
            return path
        return self.report(name, opset).path

    def report(self, name: str, opset: int = 18, precision: str = "fp32") -> ox.ExportReport:
        def export() -> ox.ExportReport:
            key = ("onnx-trace", name, precision)
            shared = self.artifacts.get(key, lambda: ox.trace_model(self.model(name), precision))
            folder = self.artifacts.folder(("onnx", name, opset, precision))
            return ox.export_onnx(
                self.model(name), folder / f"{name}_op{opset}_{precision}.onnx", opset=opset, precision=precision,
                fp32_io=precision == "fp16", weights_sha256=common.sha256_file(GOLDEN / f"{name}.pth"), trace=shared)

        return self.artifacts.get(("onnx", name, opset, precision), export)


@pytest.fixture(scope="module")
def exports(request, artifacts: ArtifactCache) -> Exports:
    """Starts, in the background, the CLI exports the selected tests of this module will need."""
    exp = Exports(artifacts)
    selected = {item.callspec.params.get("case") for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    if any(item.module is request.module and item.name.startswith("test_cli_exports")
           for item in request.session.items):
        selected.add(CLI_X2)
    for name in CLI_CASES:
        if name in selected:
            exp.submit_cli(name)
    return exp


@pytest.fixture(autouse=True, scope="module")
def _start_background(exports):
    """Start the background CLI exports with the module's first test."""


def _model_state(model: torch.nn.Module) -> dict:
    """What an exporter must leave alone: weights and buffers, attention, kernel form, caches, mode."""
    return {"tensors": {k: v.clone() for k, v in model.state_dict().items()}, "attention": model.attention,
            "form": model.dynamic_kernel_form, "training": model.training,
            "caches": [attn.cached_bias is not None for attn in model.attention_modules()]}


def _golden_io(name: str) -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN / f"{name}.io.pt", weights_only=True)


def _max_abs(a: np.ndarray, b: np.ndarray | torch.Tensor) -> float:
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# -- exports made in this process (first: the background CLI runs meanwhile) -----------------------
def test_simplification_report(exports: Exports) -> None:
    report = exports.report("esc_fp_x4_41x47_b1", 18)
    print(f"\nesc_fp op18: {report.nodes_exported} -> {report.nodes} nodes; removed {report.removed_ops}; "
          f"added {report.added_ops}; parity {report.parity_before:.2e} -> {report.parity_after:.2e}, "
          f"change {report.simplify_delta:.1e}; {report.seconds}")
    assert report.simplified and report.simplify_note == "simplified"
    assert sum(report.removed_ops.values()) > 0   # (the chunked attention layout then adds nodes)
    assert report.simplify_delta <= ox.SIMPLIFY_ATOL["fp32"]
    assert report.parity_before <= ATOL and report.parity_after <= ATOL
    assert report.probe_shape == (1, 3, 27, 45)
    rows = dict(report.summary_rows())
    assert rows["use"] == f"python -m runtimes.upscale INPUT OUTPUT --artifact {report.path}"
    assert "Softmax" in rows["top ops"] or "Softmax" in rows["attention"]
    op23 = exports.report("esc_fp_x4_41x47_b1", 23)
    assert "trace" not in op23.seconds          # reused the opset-18 trace
    assert "native ONNX Attention x5" in op23.attention_form()


def test_fp16_with_fp32_io(exports: Exports) -> None:
    if FP16_CASE not in CASES:
        pytest.skip(f"no golden case {FP16_CASE}")
    report = exports.report(FP16_CASE, 18, precision="fp16")
    proto = onnx.load(str(report.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert (meta["esc.precision"], meta["esc.io_dtype"]) == ("fp16", "float32")
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert proto.graph.input[0].type.tensor_type.elem_type == f32
    assert proto.graph.output[0].type.tensor_type.elem_type == f32
    assert proto.graph.node[0].op_type == "Cast" and proto.graph.node[0].input[0] == "lr"
    assert proto.graph.node[-1].op_type == "Cast" and proto.graph.node[-1].output[0] == "sr"
    inits = {t.name: t for t in proto.graph.initializer}
    conv_weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    assert conv_weights and all(t.data_type == f16 for t in conv_weights)
    f32_inits = [t for t in inits.values() if t.data_type == f32]
    assert sum(int(np.prod(t.dims)) for t in f32_inits) < 1024, [t.name for t in f32_inits]   # LN affine, eps
    # LayerNorm statistics (the model's own casts), the kernel estimator's global average
    # pool and the attention softmax (keep_fp32_math) run in fp32.
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for op in ("ReduceMean", "ReduceSum", "Softmax"):
        nodes = [n for n in proto.graph.node if n.op_type == op]
        assert nodes and all(types.get(n.input[0]) == f32 for n in nodes), op

    io = _golden_io(FP16_CASE)
    out = ox.run_onnx(make_session(report.path), io["lr"])
    with torch.no_grad():
        ref = exports.model(FP16_CASE)(io["lr"]).numpy()
    err = np.abs(out - ref)
    gate = compare(np.clip(ref, 0, 1), np.clip(out, 0, 1), **vars(threshold_for("fp16")))   # both legs
    print(f"\nfp16 {FP16_CASE}: max abs {err.max():.2e}, mean {err.mean():.2e}, PSNR {gate.psnr:.1f} dB vs "
          f"PyTorch fp32; simplified: {report.simplify_note}")
    assert err.max() <= FP16_MAX_ABS and err.mean() <= FP16_MEAN_ABS
    assert gate.passed and gate.psnr >= threshold_for("fp16").min_psnr, gate.summary()
    assert report.parity <= FP16_MAX_ABS


def test_export_leaves_the_callers_model_alone(exports: Exports) -> None:
    """fp32 and fp16 exports (both copy, deploy, retarget the kernel form, .half()) of one model."""
    if FP16_CASE not in CASES:
        pytest.skip(f"no golden case {FP16_CASE}")
    exports.report(FP16_CASE, 18, precision="fp16")
    exports.report(FP16_CASE, 18)
    model, before = exports.model(FP16_CASE), exports.before_export(FP16_CASE)
    after = _model_state(model)
    assert {k: v for k, v in after.items() if k != "tensors"} == {k: v for k, v in before.items() if k != "tensors"}
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert after["tensors"][key].dtype == tensor.dtype and torch.equal(after["tensors"][key], tensor), key
    assert before["form"] != "conv" and before["attention"] == "sdpa"


# -- golden cases ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "opset"), GOLDEN_PARAMS)
def test_golden_parity(exports: Exports, case: str, opset: int) -> None:
    path = exports.artifact(case, opset)
    model = exports.model(case)
    io = _golden_io(case)
    session = make_session(path)

    out = ox.run_onnx(session, io["lr"])
    with torch.no_grad():
        ref = model(io["lr"])
    vs_torch, vs_golden = _max_abs(out, ref), _max_abs(out, io["sr"])

    x = torch.rand(*SECOND_SIZE, generator=torch.Generator().manual_seed(7))
    out2 = ox.run_onnx(session, x)
    with torch.no_grad():
        ref2 = model(x)
    vs_torch2 = _max_abs(out2, ref2)
    print(f"\n{case} opset {opset}: golden {tuple(io['lr'].shape)} vs torch {vs_torch:.2e}, vs golden sr "
          f"{vs_golden:.2e}; unseen {SECOND_SIZE} vs torch {vs_torch2:.2e}")
    assert vs_torch <= ATOL and vs_golden <= ATOL and vs_torch2 <= ATOL


@pytest.mark.parametrize(("case", "opset"), GOLDEN_PARAMS)
def test_graph_and_metadata(exports: Exports, case: str, opset: int) -> None:
    path = exports.artifact(case, opset)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == ox.IR_VERSION
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == opset

    info = CASES[case]
    blocks = info["official_kwargs"]["n_blocks"]
    hist = ox.op_histogram(proto)
    if opset >= 23:
        assert hist["Attention"] == blocks and "Softmax" not in hist and "MatMul" not in hist, hist
    else:   # the default chunked form: each block's attention in DEFAULT_CHUNKS query slices
        assert hist["Softmax"] == blocks * ox.DEFAULT_CHUNKS and "Attention" not in hist, hist
    # The dense (heads, 1024, 1024) bias is gathered from the table in the graph, never stored.
    assert path.stat().st_size < info["params"] * 4 * 1.05 + (1 << 20), path.stat().st_size

    meta = {p.key: p.value for p in proto.metadata_props}
    expected = {
        "esc.variant": info["variant"], "esc.arch": info["variant"] if info["variant"] != "esc_light" else "esc",
        "esc.scale": str(info["scale"]), "esc.window_size": "32", "esc.input_multiple": "32",
        "esc.attention": "sdpa", "esc.bias": "table", "esc.opset": str(opset), "esc.precision": "fp32",
        "esc.io_dtype": "float32",
        "esc.weights_sha256": common.sha256_file(GOLDEN / f"{case}.pth"),
        "esc.toolkit_version": common.toolkit_version(), "esc.shape": "dynamic", "esc.batch": "dynamic",
    }
    assert {k: meta.get(k) for k in expected} == expected

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    (inp,), (out,) = proto.graph.input, proto.graph.output
    s = info["scale"]
    assert (inp.name, out.name) == ("lr", "sr")
    assert dims(inp) == ["batch", 3, "height", "width"]
    assert dims(out) == ["batch", 3, f"{s}*height", f"{s}*width"]


@pytest.mark.parametrize(("case", "opset"), [("esc_light_x4_35x35_b1", 18), (CLI_X2, 23)],
                         ids=["esc_light-op18", "esc_x2-op23"])
def test_any_size_and_batch(exports: Exports, case: str, opset: int) -> None:
    """The trace saw 2x39x51; the graph must not have kept any of its size decisions."""
    if case not in CASES:
        pytest.skip(f"no golden case {case}")
    session = make_session(exports.artifact(case, opset))
    model = exports.model(case)
    gen = torch.Generator().manual_seed(3)
    for shape in [(1, 3, 1, 1), (1, 3, 1, 9), (1, 3, 20, 20), (1, 3, 32, 64), (3, 3, 13, 40)]:
        x = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
        assert _max_abs(ox.run_onnx(session, x), ref) <= ATOL, shape


def _tiny_graph(factor: float) -> onnx.ModelProto:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Identity", ["lr"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["b"]),
             helper.make_node("Identity", ["b"], ["sr"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [onnx.numpy_helper.from_array(np.full((1, 3, 1, 1), factor, np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = ox.IR_VERSION
    return model


def test_simplify_checked_accepts_and_refuses(monkeypatch) -> None:
    proto = _tiny_graph(2.0)
    probe = torch.rand(1, 3, 5, 7)
    before = ox.run_onnx(proto, probe)
    ok = ox.simplify_checked(proto, probe, before)
    assert ok.simplified and ok.removed_ops.get("Identity", 0) >= 1 and ok.delta == 0.0

    monkeypatch.setattr(ox, "simplify_graph", lambda p: _tiny_graph(2.0 + 1e-4))
    refused = ox.simplify_checked(proto, probe, before)
    assert not refused.simplified and refused.model is proto
    assert "kept unsimplified" in refused.note and refused.delta > ox.SIMPLIFY_ATOL["fp32"]

    def broken(p):
        raise RuntimeError("boom")

    monkeypatch.setattr(ox, "simplify_graph", broken)
    failed = ox.simplify_checked(proto, probe, before)
    assert not failed.simplified and failed.model is proto and "boom" in failed.note


# -- command line ---------------------------------------------------------------------------------------
def _cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "export.to_onnx", *args] if module else [sys.executable, "export/to_onnx.py", *args]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_exports_golden_x2(exports: Exports) -> None:
    result, path = exports.cli(CLI_X2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    for text in ("ONNX export", str(path), "opset 18", "after onnxslim", "parity",
                 f"python -m runtimes.upscale INPUT OUTPUT --artifact {path}"):
        assert text in result.stdout, text
    assert "Traceback" not in result.stderr


def test_cli_bad_weights_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_checkpoint.pth"
    result = _cli("--weights", str(missing), "-o", str(tmp_path / "x.onnx"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_cli_unknown_model_and_bad_options(tmp_path: Path) -> None:
    result = _cli("--model", "esc_huge", "-o", str(tmp_path / "x.onnx"), module=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: unknown ESC variant 'esc_huge'"), result.stderr
    bad_shape = _cli("--model", "esc", "--shape", "big", "-o", str(tmp_path / "x.onnx"))
    assert bad_shape.returncode == 2 and bad_shape.stderr.startswith("error: shape must be"), bad_shape.stderr


# -- shared helpers (export/common.py) ------------------------------------------------------------------
def test_atomic_output_file_and_directory(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.onnx"
    with common.atomic_output(target) as tmp:
        assert tmp.parent.parent == target.parent and tmp.name == target.name
        tmp.write_bytes(b"new")
        (tmp.parent / "model.onnx.data").write_bytes(b"side")   # external data beside it
        assert not target.exists()
    assert target.read_bytes() == b"new" and (target.parent / "model.onnx.data").read_bytes() == b"side"

    with pytest.raises(RuntimeError, match="boom"):
        with common.atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]

    package = tmp_path / "esc.mlpackage"
    for content in ("one", "two"):
        with common.atomic_output(package) as tmp:
            (tmp / "Data").mkdir(parents=True)
            (tmp / "Data" / "weights.bin").write_text(content)
        assert (package / "Data" / "weights.bin").read_text() == content
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keep_fp32_math_on_a_tiny_fp16_graph() -> None:
    from onnx import TensorProto, helper

    f16 = TensorProto.FLOAT16
    nodes = [helper.make_node("Attention", ["q", "q", "q"], ["a"]),
             helper.make_node("Softmax", ["a"], ["s"], axis=-1),
             helper.make_node("ReduceMean", ["s", "axes"], ["sr"], keepdims=1)]
    graph = helper.make_graph(
        nodes, "tiny16", [helper.make_tensor_value_info("q", f16, [1, 2, 4, 8])],
        [helper.make_tensor_value_info("sr", f16, [1, 2, 4, 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [-1])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    proto.ir_version = ox.IR_VERSION
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 8)).astype(np.float16)
    before = make_session(proto).run(None, {"q": x})[0]
    assert ox.keep_fp32_math(proto) == 3
    onnx.checker.check_model(proto, full_check=True)
    attention = next(n for n in proto.graph.node if n.op_type == "Attention")
    assert {a.name: a.i for a in attention.attribute}["softmax_precision"] == TensorProto.FLOAT
    assert [n.op_type for n in proto.graph.node] == ["Attention", "Cast", "Softmax", "Cast", "Cast", "ReduceMean",
                                                     "Cast"]
    after = make_session(proto).run(None, {"q": x})[0]
    assert after.dtype == np.float16 and np.abs(after.astype(np.float32) - before).max() <= 2e-3


def test_external_data_save(tmp_path: Path, monkeypatch) -> None:
    """Protos above 1.9 GB are written with external data (exercised here on a tiny one)."""
    path = tmp_path / "big.onnx"
    proto = _tiny_graph(3.0)
    monkeypatch.setattr(ox, "EXTERNAL_DATA_MIN_TENSOR", 0)
    ox._save(proto, path, external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    x = torch.rand(1, 3, 2, 2)
    assert _max_abs(ox.run_onnx(make_session(path), x), 3.0 * x) == 0.0


def test_small_helpers(tmp_path: Path, capsys) -> None:
    assert common.human_size(512) == "512 B" and common.human_size(1536) == "1.5 KiB"
    assert common.human_size(3 * 2**20) == "3.0 MiB"
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    assert common.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert common.toolkit_version()
    common.print_summary("Title", [("artifact", "a.onnx"), ("nodes", "x " * 80)])
    out = capsys.readouterr().out.splitlines()
    assert "Title" in out[0] and len({len(line) for line in out}) == 1   # a closed box
    # Typed sizes are WIDTHxHEIGHT (runtimes.cli_args.parse_size); tuples are (H, W), tensor order.
    assert ox.parse_shape("128x96") == (96, 128) and ox.parse_shape("dynamic") == "dynamic"
    assert ox.parse_shape((96, 128)) == (96, 128)
    assert ox.parse_batch("4") == 4 and ox.parse_batch("dynamic") == "dynamic"
    for bad in ("0x5", "axb", "12"):
        with pytest.raises(ValueError):
            ox.parse_shape(bad)
    with pytest.raises(ValueError):
        ox.parse_batch("0")


def test_run_cli_turns_user_errors_into_status_2(capsys) -> None:
    from models.errors import CheckpointError

    def bad() -> int:
        raise CheckpointError("no checkpoint file at /x.pth.\nPass the path.")

    with pytest.raises(SystemExit) as info:
        common.run_cli(bad)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: no checkpoint file at /x.pth. Pass the path.\n"
    with pytest.raises(SystemExit) as info:
        common.run_cli(lambda: 0)
    assert info.value.code == 0


def test_unexportable_attention_is_a_user_error() -> None:
    from models import create_model

    with pytest.warns(UserWarning):
        model = create_model("esc_light", 2, attention="flex", allow_cpu=True)
    with pytest.raises(ox.OnnxExportError, match="cannot be exported"):
        ox.prepare_for_export(model)
