"""The interpreter's fp16 as the device runs it (``precision="ane"``), and its kernels
checked against coremltools' own value inference.

Tolerances: kernels against coremltools' value inference differ only in summation order
and transcendental approximations (float32 both sides: 1e-5 relative / 1e-6 absolute);
fp16 kernels against float64 are bounded by the fp16 accumulator's rounding (stated where
used); packages against PyTorch use the one parity table (``threshold_for``).
"""
from __future__ import annotations

import math
import platform
import warnings

import numpy as np
import pytest
from optional_deps import need
import torch

need("coremltools", "coremltools is not installed (pip install 'esc-deploy[all]')")

from export import coreml as ce
from models.fp16_safety import make_fp16_safe
from runtimes.base import RunnerError
from runtimes.coreml.fp16_kernels import (
    ACCUMULATION_BLOCK,
    FP16_KERNELS,
    matmul16,
    round16,
    sum16,
)
from runtimes.coreml.fp16_parity import format_rows, fp16_parity
from runtimes.coreml.interpreter import Interpreter
from runtimes.coreml.reader import ArgRef, MILOp
from runtimes.coreml.registry import KERNELS, Call
from runtimes.coreml_runner import compute_plan, profile_on_mac, summarise_plan
from tests.test_fp16_safety import tiny_esc
from validation.compare import threshold_for


def _op(op_type: str, **inputs) -> MILOp:
    return MILOp(op_type, op_type, {k: [ArgRef(value=v if isinstance(v, str) else np.asarray(v))]
                                    for k, v in inputs.items()}, [])


def _run(op_type: str, table=KERNELS, **inputs):
    return table[op_type](Call(_op(op_type, **inputs), {}))


# --------------------------------------------------------------------------------------
# Kernels against coremltools' value inference
# --------------------------------------------------------------------------------------
_RNG = np.random.default_rng(0)
_A = _RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)
_B = (_RNG.standard_normal((2, 3, 5, 4)) + 3).astype(np.float32)
_CASES = {
    "add": {"x": _A, "y": _A[:1]}, "sub": {"x": _A, "y": np.float32(0.5)}, "mul": {"x": _A, "y": _A},
    "real_div": {"x": _A, "y": _A + 4}, "floor_div": {"x": _A, "y": np.float32(0.3)},
    "equal": {"x": _A, "y": _A[:, :1]}, "less": {"x": _A, "y": np.float32(0)}, "greater_equal": {"x": _A, "y": np.float32(0)},
    "gelu": {"x": _A, "mode": "EXACT"}, "clip": {"x": _A, "alpha": np.float32(-0.5), "beta": np.float32(0.5)},
    "leaky_relu": {"x": _A, "alpha": np.float32(0.1)}, "sigmoid": {"x": _A}, "select": {"cond": _A > 0, "a": _A, "b": -_A},
    "cast": {"x": _A, "dtype": "int32"}, "reduce_mean": {"x": _A, "axes": [2, 3], "keep_dims": True},
    "reduce_sum": {"x": _A, "axes": [1], "keep_dims": False}, "softmax": {"x": _A, "axis": 1},
    "layer_norm": {"x": _A, "axes": [1], "epsilon": np.float32(1e-5)}, "matmul": {"x": _A, "y": _B},
    "scaled_dot_product_attention": {"query": _A, "key": _A, "value": _A},
    "reshape": {"x": _A, "shape": [2, -1]}, "transpose": {"x": _A, "perm": [0, 2, 3, 1]},
    "expand_dims": {"x": _A, "axes": [0]}, "tile": {"x": _A, "reps": [1, 2, 1, 1]},
    "slice_by_index": {"x": _A, "begin": [0, 1, 1, 0], "end": [1, 3, 4, 5]}, "split": {"x": _A, "num_splits": 2, "axis": 0},
    "gather": {"x": _A, "indices": np.array([2, 0], np.int32), "axis": 1},
    "pad": {"x": _A, "pad": np.array([1, 2, 2, 1], np.int32), "mode": "reflect"}, "shape": {"x": _A},
    "range_1d": {"start": np.int32(1), "end": np.int32(9), "step": np.int32(3)},
    "concat": {"values": _A, "axis": 1}, "conv": {"x": _A, "weight": _RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)},
    "pixel_shuffle": {"x": _RNG.standard_normal((1, 8, 2, 3)).astype(np.float32), "upscale_factor": np.int32(2)},
    "upsample_nearest_neighbor": {"x": _A, "scale_factor_height": np.float32(2), "scale_factor_width": np.float32(2)},
    "batch_norm": {"x": _A, "mean": np.zeros(3, np.float32), "variance": np.ones(3, np.float32) * 2},
    # Its own generator: drawing from _RNG here would change every later test's random data.
    "einsum": {"values": (_A, np.random.default_rng(7).standard_normal((2, 5, 4, 6)).astype(np.float32)),
               "equation": "nchw,nwhu->nchu"},
}


def _coremltools_value(op_type: str, inputs: dict):
    """coremltools' own result for the op on constant inputs (value inference), or None."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function

    kwargs = {k: (list(v) if k == "values" else v) for k, v in inputs.items()}
    if op_type == "concat":
        kwargs["values"] = [inputs["values"], inputs["values"]]
    if op_type == "einsum":
        kwargs["values"] = tuple(inputs["values"])
    with warnings.catch_warnings(), Function({}, opset_version=None):
        warnings.simplefilter("ignore")
        out = getattr(mb, op_type)(**kwargs)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return None if out.val is None else np.asarray(out.val)


def test_every_exported_op_has_a_case():
    """The table covers every kernel the interpreter has (constexpr ops are tested below)."""
    missing = sorted(k for k in KERNELS if not k.startswith("constexpr_") and k not in _CASES)
    assert not missing, f"no coremltools value-inference case for {missing}"


@pytest.mark.parametrize("op_type", sorted(_CASES))
def test_kernel_matches_coremltools_value_inference(op_type):
    inputs = _CASES[op_type]
    expected = _coremltools_value(op_type, inputs)
    if expected is None:
        pytest.skip(f"coremltools has no value inference for {op_type} (checked against torch in test_coreml.py)")
    got_inputs = dict(inputs)
    if op_type in ("concat", "einsum"):
        values = [ArgRef(value=v) for v in (inputs["values"] if op_type == "einsum" else (_A, _A))]
        rest = ({"equation": [ArgRef(value=inputs["equation"])]} if op_type == "einsum"
                else {"axis": [ArgRef(value=np.int32(1))]})
        got = KERNELS[op_type](Call(MILOp(op_type, op_type, {"values": values, **rest}, []), {}))
    else:
        got = _run(op_type, **got_inputs)
    got = got[0] if isinstance(got, list) else got
    np.testing.assert_allclose(np.asarray(got, dtype=expected.dtype), expected, rtol=1e-5, atol=1e-6,
                               err_msg=op_type)


def _constexpr_cases():
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, (4, 6)).astype(np.int8)
    return {
        "constexpr_affine_dequantize": {"quantized_data": q, "zero_point": np.int8(1), "scale": np.float32(0.25),
                                            "axis": np.int32(0)},
        "constexpr_blockwise_shift_scale": {"data": q, "scale": rng.random((2, 3)).astype(np.float32) + 0.1,
                                                "offset": np.ones((2, 3), np.int8)},
        "constexpr_lut_to_dense": {"indices": rng.integers(0, 4, (4, 6)).astype(np.uint8),
                                       "lut": rng.standard_normal((1, 1, 4, 1)).astype(np.float32)},
    }


@pytest.mark.parametrize("op_type", sorted(_constexpr_cases()))
def test_constexpr_decompression_matches_coremltools(op_type):
    """Compressed weights expand exactly as coremltools' compile-time value inference expands them."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, types

    inputs = _constexpr_cases()[op_type]
    mil_inputs = dict(inputs)
    if op_type == "constexpr_lut_to_dense":  # iOS 18 form: 2-bit indices
        mil_inputs["indices"] = inputs["indices"].astype(types.nptype_from_builtin(types.uint2))
    with warnings.catch_warnings(), Function({}, opset_version=ct_target()):
        warnings.simplefilter("ignore")
        out = getattr(mb, op_type)(**mil_inputs)
        expected = np.asarray(out.op.materialized_val_inference())
    got = _run(op_type, **inputs)
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=1e-6, atol=0, err_msg=op_type)


def ct_target():
    import coremltools as ct

    return ct.target.iOS18


# --------------------------------------------------------------------------------------
# fp16 arithmetic inside ops
# --------------------------------------------------------------------------------------
def test_round16_is_numpy_float16():
    x = np.concatenate([_RNG.standard_normal(10000) * 10.0 ** _RNG.integers(-9, 6, 10000),
                        [65504, 65519.9, 65520, -1e6, 2.0 ** -25, np.inf, 0.0]]).astype(np.float32)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(round16(x), x.astype(np.float16).astype(np.float32))


def test_sum16_overflows_where_the_fp16_accumulator_does():
    """64 terms of 2000: every term and the mean fit fp16, the running sum (128000) does not."""
    x = np.full((1, 64), 2000.0, np.float32)
    assert np.isinf(sum16(x, (1,))).all()
    assert np.isfinite(_run("reduce_sum", x=x, axes=[1])).all()  # the fp32 kernel sums fine
    assert np.isinf(_run("reduce_mean", table=FP16_KERNELS, x=x, axes=[1])).all()
    assert _run("reduce_mean", x=x, axes=[1])[0] == 2000.0  # the fp32 mean is exact here


def test_fp16_kernels_against_float64():
    """fp16 kernels stay within the fp16 accumulator's rounding bound of the exact result.

    Bound: each of ceil(K / block) additions rounds the running sum by <= 2**-11 relative,
    plus 2**-11 for each input's own rounding: (ceil(K / block) + 2) * 2**-11 * sum|a b|.
    """
    a = round16(_RNG.standard_normal((3, 8, 200)).astype(np.float32))
    b = round16(_RNG.standard_normal((3, 200, 7)).astype(np.float32))
    exact = a.astype(np.float64) @ b.astype(np.float64)
    bound = (math.ceil(200 / ACCUMULATION_BLOCK) + 2) * 2.0 ** -11 * (np.abs(a) @ np.abs(b))
    got = matmul16(a, b)
    assert (np.abs(got - exact) <= bound).all()
    assert not np.array_equal(got, round16((a @ b).astype(np.float32))), "no fp16 accumulation happened"
    x = round16(_RNG.standard_normal((2, 16, 9, 9)).astype(np.float32) * 3)
    w = round16(_RNG.standard_normal((8, 16, 3, 3)).astype(np.float32))
    conv32 = _run("conv", x=x, weight=w, pad_type="same")
    conv16 = _run("conv", table=FP16_KERNELS, x=x, weight=w, pad_type="same")
    conv_bound = (math.ceil(16 * 3 / ACCUMULATION_BLOCK) * 3 + 2) * 2.0 ** -11 * _run(
        "conv", x=np.abs(x), weight=np.abs(w), pad_type="same")
    assert (np.abs(conv16 - conv32) <= conv_bound + 1e-5).all()
    for op, kw in [("layer_norm", {"x": x, "axes": [1], "epsilon": np.float32(1e-5)}), ("softmax", {"x": x, "axis": 1}),
                   ("scaled_dot_product_attention", {"query": x[0], "key": x[1], "value": x[0]})]:
        np.testing.assert_allclose(_run(op, table=FP16_KERNELS, **kw), _run(op, **kw), atol=2e-2, err_msg=op)


def test_layer_norm_squares_overflow_only_inside_the_op():
    """Deviations of 300 fit fp16, their squares (90000) do not: 'ane' sees it, the fp32 kernel does not."""
    x = np.zeros((1, 4, 1, 1), np.float32)
    x[0, :, 0, 0] = [300, -300, 300, -300]
    assert np.isfinite(_run("layer_norm", x=x, axes=[1], epsilon=np.float32(1e-6))).all()
    got = _run("layer_norm", table=FP16_KERNELS, x=x, axes=[1], epsilon=np.float32(1e-6))
    np.testing.assert_array_equal(got, 0.0)  # inf variance: every output collapses to 0


# --------------------------------------------------------------------------------------
# Packages: image quantisation, the in-op overflow the old mode missed, and its fix
# --------------------------------------------------------------------------------------
def _convert(model: torch.nn.Module, path, image_io: bool = False):
    prepared = ce.prepare_model(model)
    cfg = ce.CoreMLExportConfig(model="esc", scale=2, input_size=(16, 16), precision="fp16", target="iOS18",
                                image_io=image_io)
    return ce.convert_module(prepared, cfg, path, model_for_metadata=prepared).path


def test_ane_mode_quantises_image_io(tmp_path):
    package = _convert(tiny_esc(seed=0), tmp_path / "image.mlpackage", image_io=True)
    interp = Interpreter(package, precision="ane")
    assert interp.image_features == {interp.input_name, interp.program.outputs[0]}
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32) * 255
    y = interp.predict(x)
    np.testing.assert_array_equal(y, np.rint(y))  # 8-bit levels out
    np.testing.assert_array_equal(y, interp.predict(np.rint(x)))  # fed as 8-bit levels
    assert not np.array_equal(Interpreter(package, precision="fp16").predict(x),
                              Interpreter(package, precision="fp16").predict(np.rint(x)))


def _inflated_esc() -> torch.nn.Module:
    """A tiny ESC whose residual stream is 512x larger (the shallow conv and the block's output
    conv multiply by 512, the tail divides it back): every activation fits fp16 and keeps
    fp16's relative precision, but LayerNorm's squared deviations (> 65504) do not fit."""
    model = tiny_esc(seed=1)
    with torch.no_grad():
        for conv in (model.proj, model.blocks[0].conv_out):
            conv.weight.mul_(512)
            conv.bias.mul_(512)
        model.to_img.weight.div_(512)
    return model


def test_ane_mode_catches_the_layernorm_overflow_and_the_safety_fix_passes(tmp_path):
    from runtimes.imageio import read_image, to_tensor
    from tests.conftest import SHARED_DIR, require_path

    set5 = require_path(SHARED_DIR / "data" / "Set5" / "LR_bicubic" / "X4")
    pictures = [to_tensor(read_image(p).rgb)[..., :16, :16].contiguous() for p in sorted(set5.glob("*.png"))]
    model = _inflated_esc()
    limit = threshold_for("fp16")

    broken = _convert(model, tmp_path / "broken.mlpackage")
    rows = {r.mode: r for r in fp16_parity(broken, model, pictures[:1])}
    print(format_rows(list(rows.values())))
    assert rows["fp16"].passed, "fp16 between ops should not see the in-op overflow"
    assert not rows["ane"].passed, "fp16 inside ops must see LayerNorm's x^2 overflow"

    safe, report = make_fp16_safe(model, pictures, progress=False)
    print(report.format())
    assert "blocks.0.ln_proj" in report.rescaled
    fixed = _convert(safe, tmp_path / "fixed.mlpackage")
    rows = fp16_parity(fixed, model, pictures[:1])  # against the *original* model: the fix is exact
    print(format_rows(rows))
    assert all(r.passed and r.psnr >= limit.min_psnr for r in rows), rows


# --------------------------------------------------------------------------------------
# On macOS: compile, predict once, compute plan, timings
# --------------------------------------------------------------------------------------
_ON_MAC = platform.system() == "Darwin"


def test_summarise_plan_counts_devices_and_names_ops_off_the_neural_engine():
    rows = [{"op": "conv", "output": "a", "device": "neural_engine", "cost": 0.5},
            {"op": "gather", "output": "b", "device": "cpu", "cost": 0.25},
            {"op": "layer_norm", "output": "c", "device": "gpu", "cost": None}]
    summary = summarise_plan(rows)
    assert summary["ops"] == 3
    assert summary["ops_per_device"] == {"neural_engine": 1, "cpu": 1, "gpu": 1}
    assert summary["cost_per_device"]["neural_engine"] == 0.5
    assert summary["ops_off_neural_engine"] == ["gather b -> cpu", "layer_norm c -> gpu"]


@pytest.mark.skipif(_ON_MAC, reason="checks the refusal off macOS; this is macOS")
def test_mac_profiling_refuses_off_macos(tmp_path):
    with pytest.raises(RunnerError, match="runs only on macOS"):
        compute_plan(tmp_path / "any.mlpackage")
    with pytest.raises(RunnerError, match="interpreter_precision='ane'"):
        profile_on_mac(tmp_path / "any.mlpackage")


@pytest.mark.skipif(not _ON_MAC, reason="Core ML prediction and MLComputePlan exist only on macOS")
def test_profile_on_mac(tmp_path):
    package = _convert(tiny_esc(seed=0), tmp_path / "tiny.mlpackage")
    result = profile_on_mac(package, compute_units="all", warmup=1, repeat=3)
    print(result)
    plan = result["plan"]
    assert plan["ops"] > 0 and sum(plan["ops_per_device"].values()) == plan["ops"]
    assert set(plan["ops_per_device"]) <= {"neural_engine", "gpu", "cpu", "None"}
    assert result["median_ms"] > 0 and result["load_ms"] > 0 and result["first_predict_ms"] > 0


# --------------------------------------------------------------------------------------
# fp16 safety in the Core ML fp16 exports (export.coreml.safety, export.calibration)
# --------------------------------------------------------------------------------------
def test_calibration_pictures_default_set_and_a_folder(tmp_path):
    from export.calibration import DEFAULT_SAMPLES, CalibrationError, calibration_pictures
    from runtimes.imageio import Image, write_image

    need("skimage", "the default calibration pictures are scikit-image's samples")
    default = calibration_pictures(size=(24, 40))
    assert len(default) == len(DEFAULT_SAMPLES)
    assert all(x.shape == (1, 3, 24, 40) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.std() > 0.02
               for x in default)
    folder = tmp_path / "mine"
    folder.mkdir()
    write_image(folder / "a.png", Image(np.full((10, 12, 3), 0.5, np.float32), None, "RGB", 8))
    (folder / "notes.txt").write_text("not a picture")
    (mine,) = calibration_pictures(folder, size=(16, 16))  # smaller than asked: edge-padded
    assert mine.shape == (1, 3, 16, 16) and torch.allclose(mine, torch.full_like(mine, 0.5), atol=1 / 255)
    with pytest.raises(CalibrationError, match="no calibration picture or folder"):
        calibration_pictures(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no pictures"):
        calibration_pictures(tmp_path / "empty")


def _checkpoint(model: torch.nn.Module, path) -> str:
    torch.save({"params_ema": model.state_dict()}, path)
    return str(path)


def test_fp16_export_rescales_layernorms_and_says_so(tmp_path):
    """The inflated model's LayerNorm overflows fp16 on real pictures: the fp16 export rescales
    it (exact), its summary says so, and the package passes in ``ane`` mode where the unsafe one fails."""
    from tests.conftest import SHARED_DIR, require_path

    set5 = require_path(SHARED_DIR / "data" / "Set5" / "LR_bicubic" / "X4")
    model = _inflated_esc()
    cfg = ce.resolve_config(None, None, _checkpoint(model, tmp_path / "inflated.pth"), input_size="16x16",
                            calibration_images=set5, output=tmp_path / "safe.mlpackage")
    result = ce.export_coreml(cfg)
    safety = result.fp16_safety
    assert safety is not None and "blocks.0.ln_proj" in safety.report.rescaled and safety.report.safe
    row = dict(ce.summary_rows(result))["fp16 safety"]
    assert row.startswith("fp16-safe on 5 picture(s)") and str(set5) in row and "blocks.0.ln_proj" in row
    pictures = [to_tensor_crop(p) for p in sorted(set5.glob("*.png"))[:1]]
    rows = {r.mode: r for r in fp16_parity(result.path, model, pictures)}
    assert rows["ane"].passed, format_rows(list(rows.values()))


def to_tensor_crop(path) -> torch.Tensor:
    from runtimes.imageio import read_image, to_tensor

    return to_tensor(read_image(path).rgb)[..., :16, :16].contiguous()


def test_fp16_export_refuses_what_it_cannot_fix_naming_the_layer(tmp_path):
    """An output convolution scaled past fp16: no exact fix, so the export is refused with its name."""
    need("skimage", "the default calibration pictures are scikit-image's samples")
    model = tiny_esc(seed=2)
    with torch.no_grad():
        model.to_img.weight.mul_(1e5)
    cfg = ce.resolve_config(None, None, _checkpoint(model, tmp_path / "loud.pth"), input_size="16x16",
                            output=tmp_path / "loud.mlpackage")
    with pytest.raises(ce.CoreMLExportError, match=r"fp16 safety: .*to_img.*--precision fp32"):
        ce.export_coreml(cfg)
    assert not (tmp_path / "loud.mlpackage").exists()
    fp32 = ce.resolve_config(None, None, str(tmp_path / "loud.pth"), input_size="16x16", precision="fp32",
                             output=tmp_path / "loud32.mlpackage")
    assert ce.export_coreml(fp32).fp16_safety is None  # fp32 exports need no fp16 safety
    with pytest.raises(ce.CoreMLExportError, match="--calibration-images records ranges for fp16"):
        ce.resolve_config("esc", 2, precision="fp32", calibration_images=tmp_path)
