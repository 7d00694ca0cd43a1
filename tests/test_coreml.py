"""Core ML export (``export/to_coreml.py``), the numpy ML-program interpreter and the runner.

Core ML prediction needs macOS, so on Linux the packages are executed by
``runtimes.coreml`` (the numpy interpreter); parity with PyTorch is what proves a conversion right.

Time budget: the seven real conversions (:func:`_cli_cases`: preset packages in the ANE
form, fp32 ANE packages at the golden sizes, today's compat form) run as CLI subprocesses
through the session's artifact cache (conftest ``artifacts``: two at a time, in the
background); only the ones the selected tests need (:data:`CASES_OF_TEST`) are started,
when the module starts, so the cheap tests (op kernels, tiny random ESC models) run
meanwhile and the tests that need a real package wait for its conversion.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from optional_deps import need
from conftest import SHARED_DIR
import torch
from torch import nn

need("coremltools", "coremltools is not installed (pip install 'esc-deploy[all]')")

from export import coreml as ce  # noqa: E402
from export.common import sha256_file  # noqa: E402
from export.verify import verify_artifact  # noqa: E402
from models.config import ESCConfig  # noqa: E402
from models.loader import build, randomise  # noqa: E402
from runtimes.coreml.interpreter import Interpreter  # noqa: E402
from runtimes.coreml.reader import (ArgRef, BlobFile, InterpreterError, MILOp, UnsupportedOpError,  # noqa: E402
                                    load_program, unpack_bits)
from runtimes.coreml.registry import KERNELS, Call  # noqa: E402
from validation.compare import threshold_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DIR
GOLDEN = SHARED / "golden"
SET5_X4 = SHARED / "data" / "Set5" / "LR_bicubic" / "X4"
CHECKPOINTS = {
    "esc": GOLDEN / "esc_x4_48x64_b1.pth",
    "esc_light": GOLDEN / "esc_light_x4_35x35_b1.pth",
    "esc_fp": GOLDEN / "esc_fp_x4_41x47_b1.pth",
}
#: Interpreter (emulated fp16) vs PyTorch fp32 on Set5 crops, for fp16 packages: the bound
#: is the one parity table's fp16 entry; measured errors are 1e-3 .. 6e-3.
FP16_ATOL = threshold_for("fp16").atol
FP16_MIN_PSNR = threshold_for("fp16").min_psnr
FP32_ATOL = threshold_for("fp32").atol


# --------------------------------------------------------------------------------------
# CLI conversions: only those the selected tests need, started when the module starts
# --------------------------------------------------------------------------------------
def _cli_cases() -> dict[str, list[str]]:
    """The presets as apps ship them (ANE form, fp16, image I/O), today's compat form, and the
    fp32 packages checked against PyTorch at the golden cases' sizes."""
    def weights(model: str) -> list[str]:
        return ["--model", model, "--weights", str(CHECKPOINTS[model])]

    return {
        # Multifunction (tile_128x128 + tile_256x256), iOS 18, scores chunked to the 8 MiB budget.
        "esc_light-iphone": [*weights("esc_light"), "--preset", "iphone"],
        # The papers' Table 9 sizes: one fixed function each.
        "esc-m2": [*weights("esc"), "--preset", "m2", "--paper-size"],
        "esc_fp-iphone": [*weights("esc_fp"), "--preset", "iphone", "--paper-size"],
        # The ANE form in fp32 at the golden inputs' sizes (padding to the window inside).
        "esc-ane-fp32": [*weights("esc"), "--form", "ane", "--input-size", "64x48", "--precision", "fp32"],
        "esc_light-ane-fp32": [*weights("esc_light"), "--form", "ane", "--input-size", "35x35", "--precision", "fp32"],
        # Today's portable form: iOS 17 at 32x32, and enumerated shapes (fused SDPA, fp32).
        "esc_light-compat": [*weights("esc_light"), "--form", "compat", "--input-size", "32x32", "--target", "iOS17"],
        "esc_light-enum": [*weights("esc_light"), "--shapes", "enumerated:32x32,64x64", "--target", "iOS18",
                           "--precision", "fp32"],
    }


#: The CLI cases each test needs; tests parametrised by ``name`` need the case of their parameter.
CASES_OF_TEST = {
    "test_cli_conversion": lambda params: [params["name"]],
    "test_fp16_package_parity_in_emulated_fp16": lambda params: ["esc_fp-iphone", "esc_light-iphone"],
    "test_ane_mode_parity_of_the_presets": lambda params: ["esc_light-iphone", "esc-m2"],
    "test_fp32_ane_package_matches_pytorch_on_the_golden_case": lambda params: [f"{params['name']}-ane-fp32"],
    "test_fp32_enumerated_package_parity": lambda params: ["esc_light-enum"],
}


def _cases_needed(items: list[pytest.Item]) -> list[str]:
    """The CLI cases the selected tests of this module need, in first-needed order."""
    needed: list[str] = []
    for item in items:
        use = CASES_OF_TEST.get(getattr(item, "originalname", item.name))
        params = item.callspec.params if hasattr(item, "callspec") else {}
        for case in (use(params) if use else []):
            if case not in needed:
                needed.append(case)
    return needed


class CoreMLCli:
    """The CLI conversions, through the session's artifact cache (built once, in the background)."""

    def __init__(self, artifacts) -> None:
        self.artifacts = artifacts

    @staticmethod
    def key(name: str) -> tuple:
        return ("coreml-cli", name)

    def _build(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        cases = _cli_cases()
        out = self.artifacts.folder(self.key(name)) / f"{name}.mlpackage"
        # Both entry points: the file and the module.
        entry = ["-m", "export.to_coreml"] if list(cases).index(name) % 2 else [str(ROOT / "export" / "to_coreml.py")]
        cmd = [sys.executable, *entry, *cases[name], "-o", str(out)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        return proc, out

    def submit(self, name: str) -> None:
        self.artifacts.submit(self.key(name), lambda: self._build(name))

    def get(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        proc, out = self.artifacts.get(self.key(name), lambda: self._build(name))
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).replace("\r", "\n").splitlines()[-25:])
            pytest.fail(f"to_coreml {name} failed (exit {proc.returncode}):\n{tail}")
        return proc, out


@pytest.fixture(scope="module")
def cli_jobs(artifacts) -> CoreMLCli:
    for path in CHECKPOINTS.values():
        if not path.is_file():
            pytest.skip(f"missing golden checkpoint {path}")
    return CoreMLCli(artifacts)


@pytest.fixture(scope="module", autouse=True)
def _start_cli_jobs_early(request):
    """Start the conversions the selected tests need before the first (cheap) test runs."""
    needed = _cases_needed([item for item in request.session.items if getattr(item, "module", None) is request.module])
    if needed:
        jobs = request.getfixturevalue("cli_jobs")
        for name in needed:
            jobs.submit(name)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _tiny_model(seed: int = 0, arch: str = "esc", scale: int = 2) -> nn.Module:
    """A small random ESC (1 block, window 8, dim 32): converts in seconds."""
    torch.manual_seed(seed)
    config = ESCConfig(arch, scale, dim=32, pdim=16, kernel_size=7, n_blocks=1, conv_blocks=1, window_size=8,
                       num_heads=2, use_lns=arch == "esc_fp", use_ln_last=arch == "esc_fp")
    model = build(config)
    randomise(model)
    return model


def _tiny_cfg(**kw) -> ce.CoreMLExportConfig:
    base = dict(model="esc", scale=2, input_size=(16, 16), precision="fp32", target="iOS18")
    base.update(kw)
    if kw.get("shapes"):
        base["input_size"] = None
    return ce.CoreMLExportConfig(**base)


def _set5_crop(h: int, w: int, name: str = "butterflyx4.png", top: int = 0, left: int = 0) -> torch.Tensor:
    from runtimes.imageio import read_image, to_tensor

    path = SET5_X4 / name
    if not path.is_file():
        pytest.skip(f"missing Set5 image {path}")
    x = to_tensor(read_image(path).rgb)
    return x[..., top:top + h, left:left + w].contiguous()


def _parity(package: Path, reference: nn.Module, x: torch.Tensor, precision: str = "auto"):
    """The package run by the interpreter vs ``reference`` on ``x`` (export.verify's comparison, not judged)."""
    return verify_artifact(package, reference, [x], "fp32", raise_on_failure=False, backend="interpreter",
                           interpreter_precision=precision)[0]


def _reference(name: str) -> nn.Module:
    from models import load_model

    return load_model(CHECKPOINTS[name], attention="naive")


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    """A tiny fixed-shape (16x16) fp32 iOS 18 package and the model it came from."""
    model = ce.prepare_model(_tiny_model())
    out = tmp_path_factory.mktemp("coreml_tiny") / "tiny.mlpackage"
    result = ce.convert_module(model, _tiny_cfg(), out, model_for_metadata=model)
    return result, model


# --------------------------------------------------------------------------------------
# Options, presets
# --------------------------------------------------------------------------------------
def test_parse_options_and_presets():
    assert ce.parse_size("128x96") == (96, 128)  # WIDTHxHEIGHT, as everywhere in the toolkit
    assert ce.parse_shapes("enumerated:64x64,128x128,64x64") == [(64, 64), (128, 128)]
    with pytest.raises(ce.CoreMLExportError, match="WIDTHxHEIGHT"):
        ce.parse_size("big")
    with pytest.raises(ce.CoreMLExportError, match="enumerated"):
        ce.parse_shapes("range:1x1")
    m2 = ce.resolve_config("esc", 4, preset="m2")
    assert (m2.tiles, m2.target, m2.precision, m2.opset, m2.form) == (
        [(128, 128), (256, 256)], "macOS15", "fp16", "iOS18", "ane")
    iphone = ce.resolve_config("esc", 4, preset="iphone", precision="fp32", paper_size=True)
    assert (iphone.input_size, iphone.target, iphone.precision) == ((32, 32), "iOS18", "fp32")
    enum = ce.resolve_config("esc", 4, shapes="enumerated:64x64,128x128")
    assert enum.enumerated and enum.input_size is None and enum.declared_shapes == [(64, 64), (128, 128)]
    with pytest.raises(ce.CoreMLExportError, match="exclude"):
        ce.resolve_config(input_size="64x64", shapes="enumerated:64x64")
    with pytest.raises(ce.CoreMLExportError, match="unknown preset"):
        ce.resolve_config(preset="pixel")


def test_table_bias_matches_dense_bias():
    from models.attention.backends import table_bias
    from models.attention.windows import dense_bias

    table = torch.randn(3, (2 * 8 - 1) ** 2)
    assert torch.equal(table_bias(table, 8), dense_bias(table, 8))


def test_kmeans_lut():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 32, 3, 3)).astype(np.float32)
    lut, idx = ce.KMeansLUT(4)(w)
    assert lut.shape == (16,) and idx.shape == (w.size,) and idx.max() < 16
    rmse = float(np.sqrt(np.mean((lut[idx].reshape(w.shape) - w) ** 2)))
    uniform = np.linspace(w.min(), w.max(), 16)
    uniform_rmse = float(np.sqrt(np.mean((uniform[np.abs(w.reshape(-1, 1) - uniform).argmin(1)] - w.reshape(-1)) ** 2)))
    assert rmse < 0.12 and rmse < 0.8 * uniform_rmse  # Lloyd-Max for a Gaussian at 4 bits: ~0.097
    few = np.array([0.5, -1.0, 0.5, 2.0], np.float32)
    lut, idx = ce.KMeansLUT(2)(few)
    np.testing.assert_array_equal(lut[idx], few)


# --------------------------------------------------------------------------------------
# Interpreter kernels against torch
# --------------------------------------------------------------------------------------
def _run_op(op_type: str, outputs: int = 1, **inputs):
    op = MILOp(op_type, op_type, {k: [ArgRef(value=np.asarray(v) if not isinstance(v, str) else v)]
                                  for k, v in inputs.items()}, [])
    return KERNELS[op_type](Call(op, {}))


@pytest.mark.parametrize("groups,stride,dilation,pad_type", [
    (1, 1, 1, "custom"), (2, 2, 1, "same"), (8, 1, 2, "valid"), (1, 2, 1, "same_lower"), (4, 1, 1, "custom")])
def test_conv_kernel(groups, stride, dilation, pad_type):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 13)
    w = torch.randn(8 if groups != 8 else 8, 8 // groups, 3, 3)
    b = torch.randn(w.shape[0])
    kwargs = dict(x=x.numpy(), weight=w.numpy(), bias=b.numpy(), strides=[stride, stride],
                  dilations=[dilation, dilation], groups=groups, pad_type=pad_type, pad=[1, 2, 0, 1])
    got = _run_op("conv", **kwargs)
    if pad_type == "custom":
        xp = torch.nn.functional.pad(x, (0, 1, 1, 2))
    elif pad_type == "valid":
        xp = x
    else:
        pads = []
        for size in (13, 11):  # W then H for F.pad
            out = -(-size // stride)
            total = max((out - 1) * stride + 2 * dilation + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads += [small, large] if pad_type == "same" else [large, small]
        xp = torch.nn.functional.pad(x, pads)
    ref = torch.nn.functional.conv2d(xp, w, b, stride=stride, dilation=dilation, groups=groups)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)


def test_elementwise_and_shape_kernels():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6)
    np.testing.assert_allclose(_run_op("gelu", x=x.numpy(), mode="EXACT"), torch.nn.functional.gelu(x).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(_run_op("gelu", x=x.numpy(), mode="TANH_APPROXIMATION"),
                               torch.nn.functional.gelu(x, approximate="tanh").numpy(), atol=1e-6)
    np.testing.assert_allclose(_run_op("pixel_shuffle", x=x.numpy(), upscale_factor=2),
                               torch.nn.functional.pixel_shuffle(x, 2).numpy())
    np.testing.assert_allclose(_run_op("pad", x=x.numpy(), pad=[1, 2, 3, 1], mode="reflect"),
                               torch.nn.functional.pad(x, (3, 1, 1, 2), mode="reflect").numpy())
    np.testing.assert_allclose(_run_op("pad", x=x.numpy(), pad=[1, 2, 3, 1], mode="replicate"),
                               torch.nn.functional.pad(x, (3, 1, 1, 2), mode="replicate").numpy())
    with pytest.raises(InterpreterError, match="pad < size"):
        _run_op("pad", x=x.numpy(), pad=[0, 0, 6, 0], mode="reflect")
    ln = _run_op("layer_norm", x=x.numpy(), axes=[1], epsilon=1e-6)
    ref = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    np.testing.assert_allclose(ln, ref.numpy(), atol=1e-5)
    mean, var, gamma, beta = torch.randn(8), torch.rand(8) + 0.5, torch.randn(8), torch.randn(8)
    np.testing.assert_allclose(_run_op("batch_norm", x=x.numpy(), mean=mean.numpy(), variance=var.numpy(),
                                       gamma=gamma.numpy(), beta=beta.numpy(), epsilon=1e-5),
                               torch.nn.functional.batch_norm(x, mean, var, gamma, beta, eps=1e-5).numpy(), atol=1e-5)
    got = _run_op("slice_by_index", x=x.numpy(), begin=[0, 1, 0, -4], end=[0, 7, 5, 0], stride=[1, 2, 1, 1],
                  begin_mask=[False, False, True, False], end_mask=[True, False, False, True],
                  squeeze_mask=[False, False, False, False])
    np.testing.assert_array_equal(got, x.numpy()[:, 1:7:2, :5, -4:])
    got = _run_op("gather", x=x.numpy(), indices=np.array([-1, 0, 2]), axis=1)
    np.testing.assert_array_equal(got, x.numpy()[:, [7, 0, 2]])
    q, k, v = torch.randn(3, 2, 10, 16), torch.randn(3, 2, 12, 16), torch.randn(3, 2, 12, 16)
    mask = torch.randn(1, 2, 10, 12)
    np.testing.assert_allclose(_run_op("scaled_dot_product_attention", query=q.numpy(), key=k.numpy(),
                                       value=v.numpy(), attn_mask=mask.numpy()),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(_run_op("matmul", x=q.numpy(), y=k.numpy(), transpose_y=True),
                               (q @ k.transpose(-1, -2)).numpy(), atol=1e-5)
    np.testing.assert_allclose(_run_op("softmax", x=x.numpy(), axis=1), torch.softmax(x, 1).numpy(), atol=1e-6)
    np.testing.assert_array_equal(_run_op("concat", values=np.int32(3), axis=0, interleave=False), [3])
    np.testing.assert_allclose(_run_op("upsample_nearest_neighbor", x=x.numpy(), scale_factor_height=2,
                                       scale_factor_width=3),
                               torch.nn.functional.interpolate(x, scale_factor=(2, 3), mode="nearest").numpy())
    np.testing.assert_array_equal(_run_op("range_1d", start=1, end=9, step=3), [1, 4, 7])
    np.testing.assert_allclose(_run_op("reduce_mean", x=x.numpy(), axes=[2, 3], keep_dims=True),
                               x.mean((2, 3), keepdim=True).numpy(), atol=1e-6)


def test_einsum_kernel_is_the_mil_form():
    """MIL einsum (x's last axis with y's axis -3, axis -2 a broadcast batch) against numpy.einsum,
    in fp32 and with the fp16 accumulator (bound: (ceil(K / 32) + 2) ulp of the sum of |terms|)."""
    from runtimes.coreml.fp16_kernels import ACCUMULATION_BLOCK, FP16_KERNELS, round16

    def op(equation, *values):
        return MILOp("einsum", "einsum", {"values": [ArgRef(value=v) for v in values],
                                          "equation": [ArgRef(value=equation)]}, [])

    rng = np.random.default_rng(0)
    keys_t = round16(rng.standard_normal((1, 64, 3, 16)).astype(np.float32))   # (B, T, windows, c)
    q = round16(rng.standard_normal((1, 16, 3, 40)).astype(np.float32))        # (B, c, windows, queries)
    got = KERNELS["einsum"](Call(op("bkhc,bchq->bkhq", keys_t, q), {}))
    np.testing.assert_allclose(got, np.einsum("bkhc,bchq->bkhq", keys_t, q), rtol=1e-5, atol=1e-5)
    bias_like = rng.standard_normal((1, 16, 1, 64)).astype(np.float32)         # H = 1: broadcast over windows
    probs = rng.random((1, 64, 3, 40)).astype(np.float32)
    np.testing.assert_allclose(KERNELS["einsum"](Call(op("bchk,bkhq->bchq", bias_like, probs), {})),
                               np.einsum("bchk,bkhq->bchq", np.broadcast_to(bias_like, (1, 16, 3, 64)), probs),
                               rtol=1e-5, atol=1e-5)
    a3, b3 = rng.standard_normal((4, 2, 5)).astype(np.float32), rng.standard_normal((5, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(KERNELS["einsum"](Call(op("chw,whu->chu", a3, b3), {})),
                               np.einsum("chw,whu->chu", a3, b3), rtol=1e-5, atol=1e-6)
    got16 = FP16_KERNELS["einsum"](Call(op("bkhc,bchq->bkhq", keys_t, q), {}))
    exact = np.einsum("bkhc,bchq->bkhq", keys_t.astype(np.float64), q.astype(np.float64))
    bound = (np.ceil(16 / ACCUMULATION_BLOCK) + 2) * 2.0 ** -11 * np.einsum("bkhc,bchq->bkhq", np.abs(keys_t), np.abs(q))
    assert (np.abs(got16 - exact) <= bound).all()
    with pytest.raises(InterpreterError, match="not MIL's nchw,nwhu->nchu form"):
        KERNELS["einsum"](Call(op("bchq,bkhc->bkhq", q, keys_t), {}))  # torch's spelling: coremltools reorders it


def test_constexpr_kernels_and_bit_unpacking():
    packed = np.array([0b11100100, 0b00000011], np.uint8)  # 2-bit fields 0,1,2,3 then 3
    np.testing.assert_array_equal(unpack_bits(packed, 2, 5, signed=False), [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(unpack_bits(np.array([0xF8], np.uint8), 4, 2, signed=True), [-8, -1])
    lut = np.array([0.0, 1.5, -2.0, 4.0], np.float32)
    got = _run_op("constexpr_lut_to_dense", lut=lut, indices=packed, shape=np.array([5], np.uint32))
    np.testing.assert_array_equal(got, lut[[0, 1, 2, 3, 3]])
    data = np.arange(8, dtype=np.int8).reshape(4, 2)
    scale = np.array([[0.5], [2.0]], np.float32)  # two blocks of two rows
    got = _run_op("constexpr_blockwise_shift_scale", data=data, scale=scale)
    np.testing.assert_allclose(got, data * np.repeat(scale, 2, axis=0))


def test_unsupported_op_is_named(tiny_package):
    result, _ = tiny_package
    program = load_program(result.path)
    program.ops[5].type = "mystery_op"
    with pytest.raises(UnsupportedOpError, match="mystery_op"):
        Interpreter(program)


def test_blob_fallback_parser_matches_native_reader(tiny_package, monkeypatch):
    """Our own weight.bin parser (used where coremltools' native reader is missing)."""
    result, _ = tiny_package

    def values(program):
        return {op.outputs[0].name: op.attributes["val"] for op in program.ops if op.type == "const"}

    native = values(load_program(result.path))
    monkeypatch.setattr(BlobFile, "read", lambda self, offset, dtype, count: self._parse(offset, dtype, count))
    parsed = values(load_program(result.path))
    big = [k for k, v in native.items() if isinstance(v, np.ndarray) and v.size > 100]
    assert big and all(np.array_equal(native[k], parsed[k]) for k in big)


# --------------------------------------------------------------------------------------
# Tiny conversions through the export code path
# --------------------------------------------------------------------------------------
def test_tiny_package_parity_and_metadata(tiny_package):
    result, model = tiny_package
    assert result.report.ok and result.report.max_rank <= 5
    assert result.report.histogram["scaled_dot_product_attention"] == 1
    meta = result.report.metadata
    assert meta["esc.scale"] == "2" and meta["esc.tile"] == "16x16" and meta["esc.weights_sha256"] == "random"
    assert meta["esc.toolkit_version"]
    assert not (result.path / "executorch_debug_handle_mapping.json").exists()
    res = _parity(result.path, model, torch.rand(1, 3, 16, 16))
    assert res.max_abs < FP32_ATOL, res


def test_export_leaves_the_callers_model_alone(tmp_path):
    """prepare_model and convert_module work on copies: the caller's attention back-end,
    dynamic-kernel form, folds and weights are what they were."""
    def state(model: nn.Module) -> tuple:
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        return model.attention, model.dynamic_kernel_form, model.deployed, weights

    def same(a: tuple, b: tuple) -> bool:
        return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])

    model = _tiny_model(seed=2)
    before = state(model)
    prepared = ce.prepare_model(model)
    assert same(state(model), before) and prepared.attention == "coreml"
    prepared_before = state(prepared)
    ce.convert_module(prepared, _tiny_cfg(image_io=True), tmp_path / "copy.mlpackage", model_for_metadata=prepared)
    assert same(state(prepared), prepared_before) and prepared.dynamic_kernel_form == "shifts"
    assert same(state(model), before)


def test_broken_conversion_is_caught(tmp_path, tiny_package):
    """A wrapper whose pixel shuffle takes channels in the wrong order converts fine and passes
    every structural check, but the interpreter's parity check catches it."""
    _, model = tiny_package
    from models.layers import pixel_shuffle, repeat_channels

    class WrongShuffle(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.inner
            s = m.scale
            t = m.to_img(m.features(x)) + repeat_channels(x, s * s)
            b, c, h, w = t.shape
            t = t.reshape(b, s * s, c // (s * s), h, w).transpose(1, 2).reshape(b, c, h, w)  # (s, s, C) order
            return pixel_shuffle(t, s)

    result = ce.convert_module(WrongShuffle(model), _tiny_cfg(), tmp_path / "broken.mlpackage",
                               model_for_metadata=model)
    assert result.report.ok  # structurally fine
    x = torch.rand(1, 3, 16, 16)
    res = _parity(result.path, model, x)
    assert res.max_abs > 100 * FP32_ATOL, res  # ... but it computes something else


def test_rank6_model_rejected(tmp_path):
    class Rank6(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.rand(1, 3, 2, 1, 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            y = x.reshape(b, c, 2, h // 2, 2, w // 2) * self.w
            return y.reshape(b, c, h, w).repeat_interleave(2, -1).repeat_interleave(2, -2)

    out = tmp_path / "rank6.mlpackage"
    with pytest.raises(ce.CoreMLExportError, match="rank"):
        ce.convert_module(Rank6(), _tiny_cfg(scale=2, input_size=(8, 8), target="iOS17"), out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_package_checks_catch_rank_target_and_pads(tmp_path, tiny_package):
    result, _ = tiny_package
    # Target availability: an iOS 18 package (fused SDPA) checked against iOS 17.
    report = ce.inspect_package(result.path, "iOS17")
    assert report.unavailable_ops == ["scaled_dot_product_attention"]
    with pytest.raises(ce.PackageCheckError, match="not available on iOS17"):
        ce.check_package(report)
    assert ce.ops_unavailable_on(["conv", "gelu", "pad"], "iOS16") == []
    # Rank: our own check, on a package doctored to declare a rank-6 tensor (coremltools
    # itself refuses to write one).
    from coremltools.proto import Model_pb2

    doctored = tmp_path / "rank6.mlpackage"
    shutil.copytree(result.path, doctored)
    spec_file = doctored / "Data" / "com.apple.CoreML" / "model.mlmodel"
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    block = spec.mlProgram.functions["main"].block_specializations[spec.mlProgram.functions["main"].opset]
    victim = next(op for op in block.operations if op.type == "conv")
    tensor = victim.outputs[0].type.tensorType
    for _ in range(2):
        tensor.dimensions.add().constant.size = 1
    tensor.rank = len(tensor.dimensions)
    spec_file.write_bytes(spec.SerializeToString())
    report = ce.inspect_package(doctored, "iOS18")
    assert report.max_rank == 6
    with pytest.raises(ce.PackageCheckError, match="rank 6"):
        ce.check_package(report)
    # Reflect pads: legal ones pass, pad >= size is reported.
    assert ce.reflect_problems("p", (1, 3, 8, 8), [2, 2, 7, 7], None) == []
    assert "pad < size" in ce.reflect_problems("p", (1, 3, 8, 8), [2, 2, 8, 0], "8x8")[0]


def test_reflect_pads_checked_at_every_enumerated_shape(tmp_path):
    class Reflect(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=3, padding_mode="reflect", dilation=3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pixel_shuffle(self.conv(x), 2)

    module = Reflect().eval()
    result = ce.convert_module(module, _tiny_cfg(shapes=[(32, 32), (64, 32)], target="iOS17"),
                               tmp_path / "reflect.mlpackage")
    assert result.report.reflect_pads == 1 and result.report.ok
    for h, w in [(32, 32), (64, 32)]:
        assert _parity(result.path, module, torch.rand(1, 3, h, w)).max_abs < FP32_ATOL


@pytest.mark.parametrize("compress,target,op,atol", [
    ("int8", "iOS18", "constexpr_blockwise_shift_scale", 3e-2),
    ("int8", "iOS17", "constexpr_affine_dequantize", 3e-2),        # iOS 16 style: parameters as attributes
    ("palettize8", "iOS17", "constexpr_lut_to_dense", 3e-2),        # iOS 16 style: packed indices + shape
    ("palettize4", "iOS18", "constexpr_lut_to_dense", 0.3),         # iOS 18 style: one LUT per 16 channels
])
def test_compressed_packages(tmp_path, tiny_package, compress, target, op, atol):
    """Compressed weights: the interpreter expands each opset's constexpr ops; the output stays
    close to the uncompressed model (random tiny weights are harder to compress than real ones)."""
    _, model = tiny_package
    result = ce.convert_module(model, _tiny_cfg(compress=compress, target=target),
                               tmp_path / f"{compress}.mlpackage", model_for_metadata=model)
    assert result.report.histogram[op] > 0 and result.report.ok
    assert result.report.metadata["esc.compression"] == compress
    res = _parity(result.path, model, torch.rand(1, 3, 16, 16))
    assert res.max_abs < atol, res


def test_image_io_package(tmp_path, tiny_package):
    _, model = tiny_package
    result = ce.convert_module(model, _tiny_cfg(image_io=True), tmp_path / "image.mlpackage", model_for_metadata=model)
    desc = load_program(result.path).description
    assert desc.input[0].type.WhichOneof("Type") == "imageType"
    assert desc.output[0].type.WhichOneof("Type") == "imageType"
    res = _parity(result.path, model, torch.rand(1, 3, 16, 16))  # fed 0..255, output / 255
    assert res.max_abs < 1e-4, res


# --------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------
def test_compute_units_parsing():
    from runtimes.base import RunnerError
    from runtimes.coreml_runner import parse_compute_units

    assert parse_compute_units(None) == "all"
    assert parse_compute_units("CPU_AND_NE") == "cpu_and_ne"
    assert parse_compute_units("cpu-and-gpu") == "cpu_and_gpu"
    assert parse_compute_units("cpu") == "cpu_only"
    assert parse_compute_units("ane") == "cpu_and_ne"
    with pytest.raises(RunnerError, match="cpu_and_ne"):
        parse_compute_units("tpu")


@pytest.mark.skipif(platform.system() == "Darwin", reason="the Linux branch of the runner")
def test_runner_refuses_coreml_backend_off_macos(tiny_package):
    from runtimes.base import RunnerError
    from runtimes.coreml_runner import CoreMLRunner

    result, _ = tiny_package
    with pytest.raises(RunnerError, match="only on macOS"):
        CoreMLRunner(result.path, backend="coreml", compute_units="cpu_and_ne")
    with pytest.raises(RunnerError, match="compute units"):
        CoreMLRunner(result.path, compute_units="npu")


def test_runner_tiles_fixed_shape_and_latency(tiny_package):
    from runtimes import base
    from runtimes.coreml_runner import CoreMLRunner, latency

    result, model = tiny_package
    runner = base.load(str(result.path))
    assert isinstance(runner, CoreMLRunner)
    assert runner.fixed_shape == (16, 16) and runner.scale == 2 and runner.precision == "fp32"
    info = runner.describe()
    if platform.system() != "Darwin":
        assert info["runtime"] == "coreml-interpreter" and "macOS" in info["backend"]
    image = torch.rand(1, 3, 20, 27)
    out = runner.upscale(image, overlap=2)
    assert out.shape == (1, 3, 40, 54)
    # Tiled through the package == tiled through PyTorch the same way.
    from runtimes.tiling import tiled_upscale

    ref = tiled_upscale(lambda t: model(t), image, 2, tile=None, fixed_shape=(16, 16), overlap=2, multiple=1)
    assert (out - ref).abs().max() < 1e-4
    stats = latency(runner, (16, 16), warmup=1, repeat=3)
    assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"] and stats["repeat"] == 3


# --------------------------------------------------------------------------------------
# The real packages (CLI, golden checkpoints)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(_cli_cases()))
def test_cli_conversion(cli_jobs, name):
    proc, out = cli_jobs.get(name)
    assert out.is_dir(), proc.stdout[-2000:]
    report = ce.inspect_package(out)
    assert report.ok and report.max_rank <= 5, report.problems
    meta = report.metadata
    model = name.split("-")[0]
    assert meta["esc.variant"] == model and meta["esc.scale"] == "4"
    assert meta["esc.weights_sha256"] == sha256_file(CHECKPOINTS[model])
    assert "artifact" in proc.stdout and str(out) in proc.stdout
    lint = ce.lint_package(out)
    if meta["esc.form"] == "ane":
        # No gather, nothing above rank 4, no flexible shape, no computed conv weights.
        assert not (lint.by_rule().keys() - {"fp32", "budget"}) and lint.max_rank == 4, lint.violations[:5]
        assert "gather" not in lint.histogram and "upsample_nearest_neighbor" not in lint.histogram
        blocks = {"esc": 5, "esc_light": 3, "esc_fp": 5}[model]
        # Three transposes per attention block (window partition, k, window merge), in every function.
        assert set(lint.transposes.values()) == {3 * blocks}, lint.transposes
    if name.endswith("-iphone") or name.endswith("-m2"):
        assert lint.ok, lint.violations[:5]  # the presets pass the whole ANE lint...
        assert max(size for size, _, _ in lint.largest.values()) <= 8 * 2**20, lint.largest  # ...budget included
        assert "ANE lint       passed" in proc.stdout and meta["esc.precision"] == "fp16"
        assert meta["esc.image_io"] == "true" and meta["esc.license"].startswith("MIT")
        assert "fp16 safety    fp16-safe" in proc.stdout and "scikit-image samples" in proc.stdout
    if name == "esc_light-iphone":
        assert report.functions == {"tile_128x128": (128, 128), "tile_256x256": (256, 256)}
        assert meta["esc.shape_mode"] == "multifunction" and report.opset == "CoreML8"
    elif name == "esc-m2":
        assert report.functions == {"main": (128, 128)} and meta["esc.tile"] == "128x128"
    elif name == "esc_fp-iphone":
        assert report.functions == {"main": (32, 32)}
    elif name == "esc_light-compat":
        # Today's form: gathers for the bias and the identity padding, rank 5 reshapes.
        assert report.opset == "CoreML7" and lint.by_rule()["gather"] > 0 and lint.max_rank == 5
    elif name == "esc_light-enum":
        assert meta["esc.tile"] == "enumerated:32x32,64x64" and lint.by_rule()["flexible-shape"] == 1


#: ``ane``-mode PSNR floors of the preset packages (interpreter: fp16 inside ops, fp16
#: accumulators, 8-bit image I/O) on 128x128 Set5 crops, as the README quotes them.
ANE_MODE_MIN_PSNR = {"esc_light-iphone": 58.0, "esc-m2": 57.3}


def test_ane_mode_parity_of_the_presets(cli_jobs):
    """The preset packages as the Neural Engine computes (the interpreter's ``ane`` mode) vs PyTorch fp32."""
    from runtimes.coreml.fp16_parity import format_rows, fp16_parity

    x = _set5_crop(128, 128, name="babyx4.png")
    for name, floor in ANE_MODE_MIN_PSNR.items():
        _, out = cli_jobs.get(name)
        (row,) = fp16_parity(out, _reference(name.split("-")[0]), [x], modes=("ane",))
        print(name, format_rows([row]))
        assert row.passed and row.psnr >= floor, (name, row)


def test_fp16_package_parity_in_emulated_fp16(cli_jobs):
    """The preset packages (fp16, image I/O) through the interpreter vs PyTorch fp32 on Set5 crops."""
    _, out = cli_jobs.get("esc_fp-iphone")
    res = ce.function_parity(out, _reference("esc_fp"), _set5_crop(32, 32, top=16, left=16), "fp16")
    assert res.max_abs < FP16_ATOL and res.psnr > FP16_MIN_PSNR, res
    _, out = cli_jobs.get("esc_light-iphone")
    res = ce.function_parity(out, _reference("esc_light"), _set5_crop(128, 128, name="babyx4.png"), "fp16")
    assert res.name.startswith("tile_128x128") and res.max_abs < FP16_ATOL and res.psnr > FP16_MIN_PSNR, res


@pytest.mark.parametrize("name", ["esc", "esc_light"])
def test_fp32_ane_package_matches_pytorch_on_the_golden_case(cli_jobs, name):
    """The ANE form in fp32 through the interpreter: the golden input, PyTorch within the fp32 bound (1e-4)."""
    _, out = cli_jobs.get(f"{name}-ane-fp32")
    lr = torch.load(str(CHECKPOINTS[name]).replace(".pth", ".io.pt"), weights_only=True)["lr"]
    res = ce.function_parity(out, _reference(name), lr, "fp32")
    assert res.max_abs < FP32_ATOL, res


def test_fp32_enumerated_package_parity(cli_jobs):
    _, out = cli_jobs.get("esc_light-enum")
    reference = _reference("esc_light")
    for h, w in [(32, 32), (64, 64)]:
        res = _parity(out, reference, _set5_crop(h, w), precision="auto")
        assert res.max_abs < FP32_ATOL, (h, w, res)


def test_cli_user_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "export" / "to_coreml.py"), "--model", "esc_light",
                           "--shapes", "enumerated:40x40", "-o", str(tmp_path / "x.mlpackage")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "multiples of the attention window" in proc.stderr
    assert not (tmp_path / "x.mlpackage").exists()


def test_validation_parity_script(tmp_path):
    """``python validation/parity.py --artifact X.mlpackage`` (runtimes.load picks the Core ML runner)."""
    if not (ROOT / "validation" / "parity.py").is_file():
        pytest.skip("validation/parity.py is not in this checkout")
    model = _tiny_model(seed=3, scale=4)
    weights = tmp_path / "tiny_x4.pth"
    torch.save({"params_ema": model.state_dict()}, weights)
    model = ce.prepare_model(model)
    package = tmp_path / "tiny_x4.mlpackage"
    ce.convert_module(model, _tiny_cfg(scale=4, shapes=[(32, 32), (64, 64)]), package, model_for_metadata=model)
    proc = subprocess.run([sys.executable, str(ROOT / "validation" / "parity.py"), "--artifact", str(package),
                           "--weights", str(weights), "--dataset", str(SET5_X4.parents[1]), "--scale", "4",
                           "--overlap", "8", "--quiet",
                           "--json", str(tmp_path / "parity.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "coreml" in proc.stdout
    # The runner of an enumerated package: tiles at its largest size, runs every listed size.
    from runtimes.coreml_runner import CoreMLRunner

    runner = CoreMLRunner(package)
    assert runner.fixed_shape == (64, 64) and runner.describe()["enumerated_shapes"] == [[32, 32], [64, 64]]
    x = torch.rand(1, 3, 32, 32)
    assert (runner.infer(x) - model(x)).abs().max() < FP32_ATOL
    assert runner.infer(torch.rand(1, 3, 20, 40)).shape == (1, 3, 80, 160)  # padded to 64x64, cropped
