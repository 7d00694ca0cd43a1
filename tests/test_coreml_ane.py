"""The Neural Engine form (``models.ane``), the ANE lint, multifunction tile packages and
the Core ML export gate on a broken artifact.

Cheap tests on tiny random models (seconds each); the real esc / esc_light preset
packages are converted and checked in ``tests/test_coreml.py``.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
from optional_deps import need
from conftest import SHARED_DIR
import torch
import torch.nn.functional as F
from torch import nn

need("coremltools", "coremltools is not installed (pip install 'esc-deploy[all]')")

from export import coreml as ce  # noqa: E402
from models.ane import ane_form  # noqa: E402
from models.config import ESCConfig  # noqa: E402
from models.errors import ModelOptionError  # noqa: E402
from models.loader import build, randomise  # noqa: E402
from runtimes.coreml.reader import load_program  # noqa: E402
from validation.compare import threshold_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_RIB = SHARED_DIR / "golden_rib"
#: The ANE form computes the same sums as today's form, possibly in another order (a
#: (B, 9C, 1, 1) product summed by a 1x1 conv instead of a reduce; per-head matmuls):
#: fp32 rounding differences of a few ulp of values of order 1.
FORM_ATOL = 1e-5
FP32_ATOL = threshold_for("fp32").atol


def _tiny(arch: str = "esc", scale: int = 2, seed: int = 0) -> nn.Module:
    """A small random ESC (1 block, window 8, 2 heads): converts in seconds."""
    torch.manual_seed(seed)
    config = ESCConfig(arch, scale, dim=32, pdim=16, kernel_size=7, n_blocks=1, conv_blocks=2, window_size=8,
                       num_heads=2, use_lns=arch == "esc_fp", use_ln_last=arch == "esc_fp")
    model = build(config)
    randomise(model)
    return model.deploy().set_attention("naive")


# --------------------------------------------------------------------------------------
# The ANE form of the model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["esc", "esc_fp"])
@pytest.mark.parametrize("size,chunk", [((16, 24), None), ((16, 24), 24), ((13, 21), 40), ((5, 3), None)])
def test_ane_form_matches_todays_form(arch, size, chunk):
    """Window multiples, padded sizes (a pad op), tiny inputs (the gather fallback), query chunks; batch 2."""
    model = _tiny(arch)
    ane = ane_form(copy.deepcopy(model), query_chunk=chunk)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected, got = model(x), ane(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < FORM_ATOL


def test_ane_form_bias_is_a_constant_of_the_table():
    """Each (head, chunk) constant is that slice of the dense bias; the form reacts to it."""
    from models.attention.windows import dense_bias

    model = _tiny()
    ane = ane_form(copy.deepcopy(model), query_chunk=24)
    attn = ane.model.blocks[0].attn
    dense = dense_bias(attn.relative_position_bias, attn.window)[0]
    assert len(attn.ane_bias.chunks) == 3  # 64 queries in chunks of 24
    assert torch.equal(attn.ane_bias.get(1, 2), dense[1, 48:64])
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        before = ane(x)
        attn.ane_bias.h0_q0 += torch.randn_like(attn.ane_bias.h0_q0)  # (a row-constant shift would cancel)
        assert (ane(x) - before).abs().max() > 1e-4  # the constant is what the attention adds


def test_ane_form_trace_is_rank4_without_index_math():
    """At window multiples the traced graph has no gather/index op and no tensor above rank 4."""
    ane = ane_form(copy.deepcopy(_tiny()), query_chunk=32)
    ep = torch.export.export(ane, (torch.rand(1, 3, 16, 16),)).run_decompositions({})
    ranks, index_ops = [], []
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            ranks.append(val.dim())
        if node.op == "call_function" and any(k in str(node.target) for k in ("index", "gather", "remainder")):
            index_ops.append(str(node.target))
    assert max(ranks) <= 4 and not index_ops, (max(ranks), index_ops)


def test_ane_form_refuses_what_it_cannot_do():
    with pytest.raises(ModelOptionError, match="ANE form exists for"):
        from models.ane import AneModel

        AneModel(build(ESCConfig("esc_real", 4, dim=32, pdim=16, kernel_size=7, n_blocks=1, conv_blocks=1,
                                 window_size=8, num_heads=2, exp_ratio=2.0, use_lns=True)))
    with pytest.raises(ModelOptionError, match="query_chunk"):
        ane_form(copy.deepcopy(_tiny()), query_chunk=0)
    from models.loader import create_model

    with pytest.raises(ModelOptionError, match="972 MiB in fp16"):  # ESC-XL: 8 blocks x 12 heads x 2304^2 x 2 B
        ane_form(create_model("esc_xl", 4))


# --------------------------------------------------------------------------------------
# The ANE lint: one package per violation, each must fail
# --------------------------------------------------------------------------------------
class _Gather(nn.Module):
    def forward(self, x):
        return x.index_select(3, torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])).repeat(1, 1, 2, 2) * 2.0


class _Rank5(nn.Module):
    def forward(self, x):
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w).permute(0, 1, 3, 2, 4)
        return F.interpolate(y.reshape(b, c, h, w), scale_factor=2.0, mode="nearest")


class _ComputedConvWeight(nn.Module):
    def forward(self, x):
        weight = x.mean(dim=(2, 3)).reshape(3, 1, 1, 1)
        return F.interpolate(F.conv2d(x, weight, groups=3), scale_factor=2.0, mode="nearest")


class _Clean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


class _BigConstant(nn.Module):
    """Adds a (1, 3, 512, 512) constant: above the compat form's folding limit, so it stays fp32 in an fp16 program."""

    def __init__(self):
        super().__init__()
        self.register_buffer("big", torch.rand(1, 3, 512, 512))

    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest") + self.big


def _lint(module: nn.Module, tmp_path: Path, name: str, **cfg) -> ce.LintReport:
    base = dict(model="toy", scale=2, input_size=(8, 8), precision="fp16", target="iOS18", form="ane")
    base.update(cfg)
    config = ce.CoreMLExportConfig(**base)
    result = ce.convert_module(module, config, tmp_path / f"{name}.mlpackage", check=False)
    return result.lint if result.lint is not None else ce.lint_package(result.path)


@pytest.mark.parametrize("module,rule,where", [
    (_Gather(), "gather", "test_coreml_ane.py"),
    (_Rank5(), "rank", "test_coreml_ane.py"),
    (_ComputedConvWeight(), "dynamic-conv", "test_coreml_ane.py"),
])
def test_lint_rejects_each_violation_and_names_its_source(tmp_path, module, rule, where):
    report = _lint(module, tmp_path, rule)
    assert not report.ok and rule in report.by_rule(), report.violations
    offending = [v for v in report.violations if v.rule == rule]
    assert all(v.op for v in offending) and any(v.source and where in v.source for v in offending), offending
    with pytest.raises(ce.AneLintError, match=rule):
        report.raise_if_failed()


def test_lint_rejects_fp32_compute_and_flexible_shapes(tmp_path):
    fp32 = _lint(_Clean(), tmp_path, "fp32", precision="fp32")
    assert fp32.by_rule()["fp32"] >= 2, fp32.violations  # the conv and the pixel shuffle
    flexible = _lint(_Clean(), tmp_path, "flex", form="compat", input_size=None, shapes=[(32, 32), (64, 64)])
    assert flexible.by_rule()["flexible-shape"] == 1, flexible.violations
    cast = _lint(_BigConstant(), tmp_path, "cast", form="compat", input_size=(256, 256))
    assert any(v.rule == "fp32" and "constant" in v.detail for v in cast.violations), cast.violations
    clean = _lint(_Clean(), tmp_path, "clean", image_io=True)
    assert clean.ok, clean.violations  # only the I/O casts touch fp32


def test_exporter_refuses_a_package_that_fails_the_lint(tmp_path):
    out = tmp_path / "gather.mlpackage"
    config = ce.CoreMLExportConfig(model="toy", scale=2, input_size=(8, 8), precision="fp16", target="iOS18",
                                   form="ane")
    with pytest.raises(ce.AneLintError, match=r"\[gather\]"):
        ce.convert_module(_Gather(), config, out)
    assert not out.exists()


def test_contract_check_catches_an_output_of_the_wrong_scale(tmp_path):
    """Our own contract (not coremltools'): every output is ``scale`` times its input."""
    class HalfWide(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=(2.0, 1.0), mode="nearest")

    config = ce.CoreMLExportConfig(model="toy", scale=2, input_size=(8, 8), precision="fp32", target="iOS18")
    with pytest.raises(ce.PackageCheckError, match="is not x2 of the 8x8 input"):
        ce.convert_module(HalfWide(), config, tmp_path / "half.mlpackage")
    assert not (tmp_path / "half.mlpackage").exists()


# --------------------------------------------------------------------------------------
# Multifunction tile packages
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tile_package(tmp_path_factory):
    """A tiny ESC in the ANE form, fp16, image I/O, tiles 16x16 and 24x16 (WxH): two functions."""
    model = _tiny()
    prepared = ce.prepare_model(model, form="ane", query_chunk=32)
    config = ce.CoreMLExportConfig(model="esc", scale=2, input_size=None, tiles=[(16, 16), (16, 24)],
                                   precision="fp16", target="iOS18", image_io=True, form="ane", query_chunk=32)
    out = tmp_path_factory.mktemp("ane_tiles") / "tiles.mlpackage"
    return ce.convert_module(prepared, config, out, model_for_metadata=prepared), model


def test_multifunction_package_has_one_static_function_per_tile(tile_package):
    result, _ = tile_package
    assert result.report.functions == {"tile_16x16": (16, 16), "tile_24x16": (16, 24)}
    assert result.lint is not None and result.lint.ok and result.lint.max_rank <= 4, result.lint.summary()
    meta = result.report.metadata
    assert meta["esc.shape_mode"] == "multifunction" and meta["esc.functions"] == "tile_16x16,tile_24x16"
    assert meta["esc.form"] == "ane" and "window grid" in meta["esc.tiling"] and meta["esc.license"]
    for name in ("tile_16x16", "tile_24x16"):
        program = load_program(result.path, function=name)
        assert program.inputs[0].shape == (1, 3, *result.report.functions[name])
    rows = dict(ce.summary_rows(result))
    assert rows["ANE lint"].startswith("passed") and "tile_24x16" in rows["input"]


def test_every_function_matches_pytorch(tile_package):
    """fp16 package through the interpreter (fp16 between ops) vs fp32 PyTorch: the fp16 parity entry."""
    result, model = tile_package
    for h, w in [(16, 16), (16, 24)]:
        res = ce.function_parity(result.path, model, torch.rand(1, 3, h, w), "fp16")
        assert res.passed and res.name.startswith(f"tile_{w}x{h}"), res.summary()


def test_fp16_tensor_io_package(tmp_path):
    """fp16 in, fp16 out: no I/O cast at all, the lint passes, PyTorch parity at the fp16 entry."""
    model = _tiny()
    prepared = ce.prepare_model(model, form="ane")
    config = ce.CoreMLExportConfig(model="esc", scale=2, input_size=(16, 16), precision="fp16", target="iOS18",
                                   form="ane", io_dtype="fp16")
    result = ce.convert_module(prepared, config, tmp_path / "io16.mlpackage", model_for_metadata=prepared)
    program = load_program(result.path)
    assert program.inputs[0].dtype == "FLOAT16" and "cast" not in result.report.histogram
    assert result.lint.ok and result.report.metadata["esc.io_dtype"] == "float16", result.lint.violations
    assert ce.function_parity(result.path, model, torch.rand(1, 3, 16, 16), "fp16").passed
    with pytest.raises(ce.CoreMLExportError, match="fp16 tensor I/O"):
        ce.resolve_config("esc", 4, preset="m2", io_dtype="fp16")  # presets have image I/O


def test_multifunction_needs_ios18_and_ane_needs_fixed_shapes():
    with pytest.raises(ce.CoreMLExportError, match="multifunction package"):
        ce.resolve_config("esc", 4, preset="iphone", target="iOS17")
    with pytest.raises(ce.CoreMLExportError, match="fixed shapes only"):
        ce.resolve_config("esc", 4, preset="m2", shapes="enumerated:64x64,128x128")


# --------------------------------------------------------------------------------------
# The export gate on a broken artifact
# --------------------------------------------------------------------------------------
def test_export_gate_fails_on_a_corrupted_constant(tmp_path):
    """Scramble the stored convolution weights of a written fp32 package: the gate must fail."""
    sys.path.insert(0, str(ROOT / "export"))
    import to_coreml

    model = _tiny()
    prepared = ce.prepare_model(model, form="ane")
    config = ce.CoreMLExportConfig(model="esc", scale=2, input_size=(16, 16), precision="fp32", target="iOS18",
                                   form="ane")
    result = ce.convert_module(prepared, config, tmp_path / "ok.mlpackage", model_for_metadata=prepared)
    assert to_coreml.verify_rows(result, None)[0][1].endswith("ok")  # the intact package passes

    weights = next(result.path.rglob("weight.bin"))
    blob = bytearray(weights.read_bytes())
    # The first blob after the 64-byte storage header + 64-byte record is the first constant
    # stored in the file; overwrite 256 bytes of it with large values.
    blob[128:128 + 256] = np.full(64, 7.5, dtype=np.float32).tobytes()
    weights.write_bytes(bytes(blob))
    with pytest.raises(ce.PackageParityError, match="does not reproduce PyTorch") as info:
        to_coreml.verify_rows(result, None)
    assert "FAILED" in info.value.rows[0][1]


# --------------------------------------------------------------------------------------
# Options and the command line (WIDTHxHEIGHT everywhere)
# --------------------------------------------------------------------------------------
def test_sizes_are_width_by_height():
    assert ce.parse_size("160x128") == (128, 160)
    assert ce.parse_tiles("128x128,256x192") == [(128, 128), (192, 256)]
    assert ce.parse_shapes("enumerated:64x32,64x32") == [(32, 64)]
    with pytest.raises(ce.CoreMLExportError, match="WIDTHxHEIGHT"):
        ce.parse_size("128")
    cfg = ce.resolve_config("esc", 4, input_size="160x128", form="ane")
    assert cfg.declared_shapes == [(128, 160)] and cfg.shape_text == "160x128"
    paper = ce.resolve_config("esc", 4, preset="iphone", paper_size=True)
    assert paper.declared_shapes == [(32, 32)] and not paper.multifunction and paper.form == "ane"
    app = ce.resolve_config("esc", 4, preset="m2")
    assert app.multifunction and app.declared_shapes == [(128, 128), (256, 256)] and app.image_io
    assert app.ane_target and app.target == "macOS15"
    with pytest.raises(ce.CoreMLExportError, match="exclude each other"):
        ce.resolve_config(preset="m2", tiles="128x128", paper_size=True)


# --------------------------------------------------------------------------------------
# The successor models (ESC-RIB) through the compat form
# --------------------------------------------------------------------------------------
def test_esc_rib_fp32_package_matches_pytorch(tmp_path):
    """The golden ESC-RIB x4 checkpoint at its golden 70x45 input: interpreter vs PyTorch within 1e-4."""
    from models import load_model
    from runtimes.coreml.registry import KERNELS

    ckpt = GOLDEN_RIB / "esc_rib_x4_45x70_b1.pth"
    if not ckpt.is_file():
        pytest.skip(f"missing golden checkpoint {ckpt}")
    lr = torch.load(GOLDEN_RIB / "esc_rib_x4_45x70_b1.io.pt", weights_only=True)["lr"]
    cfg = ce.resolve_config(None, None, str(ckpt), input_size="70x45", precision="fp32",
                            output=tmp_path / "esc_rib.mlpackage")
    result = ce.export_coreml(cfg)
    assert result.report.ok and result.report.metadata["esc.variant"] == "esc_rib", result.report.problems
    # The positional factors are folded constants; the mask-free SDPA is decomposed (explicit scale).
    assert result.report.histogram["softmax"] == 5 and result.report.histogram["sigmoid"] == 5  # 5 blocks, 5 gates
    if "sigmoid" not in KERNELS:
        pytest.skip("the interpreter has no sigmoid kernel yet (RIB's gate); runtimes/coreml owns it")
    reference = load_model(ckpt, attention="naive")
    res = ce.function_parity(result.path, reference, lr, "fp32")
    assert res.max_abs < FP32_ATOL, res.summary()


def test_sst_fp32_package_matches_pytorch(tmp_path):
    """SST x4 (golden weights, file named without 'plus', so the model is named): interpreter vs PyTorch <= 1e-4."""
    from models import load_model

    ckpt = GOLDEN_RIB / "sst_x4_40x52_b1.pth"
    if not ckpt.is_file():
        pytest.skip(f"missing golden checkpoint {ckpt}")
    lr = torch.load(GOLDEN_RIB / "sst_x4_40x52_b1.io.pt", weights_only=True)["lr"]
    cfg = ce.resolve_config("sst", None, str(ckpt), input_size=f"{lr.shape[-1]}x{lr.shape[-2]}", precision="fp32",
                            output=tmp_path / "sst.mlpackage")
    result = ce.export_coreml(cfg)
    assert result.report.ok and result.report.metadata["esc.variant"] == "sst", result.report.problems
    res = ce.function_parity(result.path, load_model(ckpt, attention="naive", variant="sst"), lr, "fp32")
    assert res.max_abs < FP32_ATOL, res.summary()
