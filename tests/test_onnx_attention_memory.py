"""Attention in ONNX without full (windows, heads, 1024, 1024) score tensors (issue 13).

:mod:`export.onnx_attention` rewrites each attention into query slices (``chunked``, the
default below opset 23) or the contrib ``MultiHeadAttention`` (``mha``). Checked here:

- on small hand-built graphs (both the native opset-23 ``Attention`` and the opset-18
  ``MatMul -> Add -> Softmax -> MatMul`` chain): the structure of each form and that it
  computes the same numbers, and the refusals;
- in ONNX Runtime, in a child process: the chunked form's peak memory on one ESC-sized
  attention (16 windows, 4 heads, 1024 tokens) against the native node's;
- the esc_light golden export made by the toolkit's default path (``conftest.golden_onnx``):
  every Softmax sees 1024 / 16 query rows, and the graph matches PyTorch and the golden
  ``sr`` within 1e-4;
- the export's parity gate refuses a rewrite that breaks the arithmetic.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import shift_one_pixel
from onnx import TensorProto, helper

from export import onnx_export as ox
from export.onnx_attention import AttentionRewriteError, rewrite_attention
from runtimes.onnx_runner import make_session

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4                 # the fp32 parity threshold (validation.compare.THRESHOLDS)
SAME_SUM_ATOL = 1e-6        # a rewrite that only regroups rows: float rounding of fp32 values in [-10, 10]


def _attention_graph(opset: int, windows: int | str, heads: int, rows: int, dim: int) -> onnx.ModelProto:
    """q, k, v (windows, heads, rows, dim) and a (1, heads, rows, rows) bias -> attention output.

    Opset 23: one native ``Attention``; opset 18: the chain torch's exporter writes.
    """
    shape = [windows, heads, rows, dim]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, heads, rows, rows]))
    scale = dim ** -0.5
    if opset >= 23:
        nodes = [helper.make_node("Attention", ["q", "k", "v", "bias"], ["out"], name="attn", scale=scale)]
    else:
        nodes = [helper.make_node("Transpose", ["k"], ["k_t"], name="kt", perm=[0, 1, 3, 2]),
                 helper.make_node("Mul", ["q", "scale"], ["q_s"], name="qs"),
                 helper.make_node("MatMul", ["q_s", "k_t"], ["scores"], name="qk"),
                 helper.make_node("Add", ["scores", "bias"], ["biased"], name="add_bias"),
                 helper.make_node("Softmax", ["biased"], ["probs"], name="softmax", axis=-1),
                 helper.make_node("MatMul", ["probs", "v"], ["out"], name="pv")]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                           shape)],
                              [onnx.numpy_helper.from_array(np.array(scale, np.float32), "scale")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = ox.IR_VERSION
    return proto


def _feeds(windows: int, heads: int, rows: int, dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal((windows, heads, rows, dim)).astype(np.float32) for n in "qkv"}
    feeds["bias"] = rng.uniform(-10, 10, (1, heads, rows, rows)).astype(np.float32)
    return feeds


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return make_session(proto, threads=1).run(None, feeds)[0]


def _softmax_rows(proto: onnx.ModelProto) -> list:
    """Query rows (axis -2) of every score tensor: Softmax inputs, or native Attention queries."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input]}
    return [shapes[n.input[0]][-2] for n in proto.graph.node if n.op_type in ("Softmax", "Attention")]


# -- the forms on small graphs ---------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [18, 23])
def test_chunked_form_structure_and_numbers(opset: int) -> None:
    proto = _attention_graph(opset, "windows", heads=2, rows=16, dim=8)
    feeds = _feeds(3, 2, 16, 8)
    before = _run(proto, feeds)
    assert rewrite_attention(proto, "chunked", chunks=4) == 1
    onnx.checker.check_model(proto, full_check=True)
    hist = ox.op_histogram(proto)
    assert hist["Attention" if opset >= 23 else "Softmax"] == 4 and hist["Concat"] == 1 and hist["Split"] == 2
    assert _softmax_rows(proto) == [4, 4, 4, 4]
    after = _run(proto, feeds)
    assert np.abs(after - before).max() <= SAME_SUM_ATOL


def test_mha_form_structure_and_numbers() -> None:
    proto = _attention_graph(23, "windows", heads=2, rows=16, dim=8)
    feeds = _feeds(3, 2, 16, 8, seed=1)
    before = _run(proto, feeds)
    assert rewrite_attention(proto, "mha") == 1
    hist = ox.op_histogram(proto)
    assert hist["MultiHeadAttention"] == 1 and "Attention" not in hist
    assert any(o.domain == "com.microsoft" for o in proto.opset_import)
    assert np.abs(_run(proto, feeds) - before).max() <= SAME_SUM_ATOL


def test_native_form_and_mask_free_graphs() -> None:
    proto = _attention_graph(23, 2, heads=2, rows=16, dim=8)
    assert rewrite_attention(proto, "native") == 0 and ox.op_histogram(proto)["Attention"] == 1
    # A mask-free chain (the RIB models' opset-18 form) is chunked as well.
    free = _attention_graph(18, 2, heads=2, rows=16, dim=8)
    node = next(n for n in free.graph.node if n.op_type == "Softmax")
    node.input[0] = "scores"
    del free.graph.node[[n.name for n in free.graph.node].index("add_bias")]
    free.graph.input.pop()     # no bias input any more
    feeds = {k: v for k, v in _feeds(2, 2, 16, 8).items() if k != "bias"}
    before = _run(free, feeds)
    assert rewrite_attention(free, "chunked", chunks=2) == 1 and "Add" not in ox.op_histogram(free)
    assert np.abs(_run(free, feeds) - before).max() <= SAME_SUM_ATOL


def test_refusals_name_the_problem() -> None:
    with pytest.raises(AttentionRewriteError, match="do not split into 3 equal chunks"):
        rewrite_attention(_attention_graph(23, 2, 2, 16, 8), "chunked", chunks=3)
    with pytest.raises(AttentionRewriteError, match="at least 2"):
        rewrite_attention(_attention_graph(23, 2, 2, 16, 8), "chunked", chunks=1)
    with pytest.raises(AttentionRewriteError, match="must be one of"):
        rewrite_attention(_attention_graph(23, 2, 2, 16, 8), "flash")
    unknown = _attention_graph(23, 2, 2, "tokens", 8)
    with pytest.raises(AttentionRewriteError, match="known heads, tokens"):
        rewrite_attention(unknown, "chunked")


# -- what ONNX Runtime holds ------------------------------------------------------------------------------------
PEAK_CHILD = r"""
import json, sys
import numpy as np, onnx
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from export.onnx_attention import rewrite_attention
from runtimes.onnx_runner import make_session
from tests.test_onnx_attention_memory import _attention_graph, _feeds
form = sys.argv[2]
proto = _attention_graph(23, 16, 4, 1024, 16)
rewrite_attention(proto, form, 16)
feeds = _feeds(16, 4, 1024, 16)
session = make_session(proto, threads=1)
def kb(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
session.run(None, feeds)
print(json.dumps({"peak_mb": (kb("VmHWM") - base) / 1024}))
"""


def _peak_mb(form: str) -> float:
    result = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(REPO), form], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_chunked_attention_holds_a_fraction_of_the_scores() -> None:
    """One ESC-sized attention at 128x128 input: 16 windows x 4 heads x 1024 x 1024 fp32
    scores are 256 MB. The native node holds them all (its peak is above 200 MB); 16 query
    slices hold 16 MB at a time, so the chunked peak must be far below half the native one."""
    native, chunked = _peak_mb("native"), _peak_mb("chunked")
    print(f"\nONNX Runtime peak RSS growth, one attention (16 windows, 4 heads, 1024 tokens): native "
          f"{native:.0f} MB, chunked x16 {chunked:.0f} MB")
    assert native > 200 and chunked < native / 2


# -- the toolkit's default export ---------------------------------------------------------------------------------
def test_default_export_is_chunked_and_matches(golden_onnx: Path, checkpoint: Path) -> None:
    from models import load_model

    proto = onnx.load(str(golden_onnx))
    rows = _softmax_rows(proto)
    assert len(rows) == 3 * ox.DEFAULT_CHUNKS and set(rows) == {1024 // ox.DEFAULT_CHUNKS}, rows
    io = torch.load(checkpoint.with_name(checkpoint.name.replace(".pth", ".io.pt")), weights_only=True)
    with torch.no_grad():
        ref = load_model(checkpoint)(io["lr"]).numpy()
    out = ox.run_onnx(make_session(golden_onnx), io["lr"])
    assert np.abs(out - ref).max() <= ATOL and np.abs(out - io["sr"].numpy()).max() <= ATOL


def test_export_gate_refuses_a_broken_rewrite(tmp_path: Path, monkeypatch) -> None:
    """A rewrite that mixes up the query slices' order is caught before anything is written."""
    from models import create_model

    def broken(proto, form, chunks):
        count = rewrite_attention(proto, form, chunks)
        concat = next(n for n in proto.graph.node if n.op_type == "Concat" and n.name.endswith("_concat"))
        concat.input[0], concat.input[1] = concat.input[1], concat.input[0]
        return count

    with pytest.warns(UserWarning):
        model = create_model("esc_light", 2)
    monkeypatch.setattr(ox, "rewrite_attention", broken)
    target = tmp_path / "broken.onnx"
    with pytest.raises(ox.OnnxExportError, match="does not reproduce the PyTorch model"):
        ox.export_onnx(model, target, shape=(40, 36), batch=1, simplify=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("shift", "passed"), [(0.9e-4, True), (1.1e-4, False)], ids=["0.9x-atol", "1.1x-atol"])
def test_rewrite_gate_at_the_fp32_bound(tiny_checkpoint: Path, tmp_path: Path, monkeypatch, shift: float,
                                        passed: bool) -> None:
    """A layout rewrite that moves one output pixel by 10% under / over the fp32 bound: written / refused."""
    from models import load_model

    def off_by(proto, form, chunks):
        count = rewrite_attention(proto, form, chunks)
        shift_one_pixel(proto, shift)
        return count

    monkeypatch.setattr(ox, "rewrite_attention", off_by)
    target = tmp_path / "shifted.onnx"
    model = load_model(tiny_checkpoint)
    if passed:
        assert ox.export_onnx(model, target, shape=(20, 28), batch=1, simplify=False).parity_after <= 1e-4
        assert target.is_file()
    else:
        with pytest.raises(ox.OnnxExportError, match="does not reproduce the PyTorch model"):
            ox.export_onnx(model, target, shape=(20, 28), batch=1, simplify=False)
        assert list(tmp_path.iterdir()) == []
