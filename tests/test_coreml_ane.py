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


def _tiny(arch: str = "esc", scale: int = 2, seed: int = 0, kernel: int = 7) -> nn.Module:
    """A small random ESC (1 block, window 8, 2 heads): converts in seconds."""
    torch.manual_seed(seed)
    config = ESCConfig(arch, scale, dim=32, pdim=16, kernel_size=kernel, n_blocks=1, conv_blocks=2, window_size=8,
                       num_heads=2, use_lns=arch == "esc_fp", use_ln_last=arch == "esc_fp")
    model = build(config)
    randomise(model)
    return model.deploy().set_attention("naive")


# --------------------------------------------------------------------------------------
# The ANE form of the model
# --------------------------------------------------------------------------------------
#: (size, tensor budget in bytes, large-kernel pieces, mean as convs): the whole window in one
#: score tensor; one window per chunk (8 KiB = 64 x 64 fp16 scores); 32-query chunks
#: (4 KiB); a padded size (pad op) with both contingencies; a tiny input (the gather
#: fallback); batch 2 everywhere.
FORM_CASES = [((16, 24), 8 << 20, False, False), ((16, 24), 8192, False, False), ((16, 8), 4096, True, True),
              ((13, 21), 6000, True, True), ((5, 3), 8 << 20, False, True)]


@pytest.mark.parametrize("arch", ["esc", "esc_fp"])
@pytest.mark.parametrize("size,budget,pieces,mean", FORM_CASES)
def test_ane_form_matches_todays_form(arch, size, budget, pieces, mean):
    """The Neural Engine layout, chunked to the budget, against the deployed model in fp32."""
    model = _tiny(arch, kernel=13 if pieces else 7)
    ane = ane_form(copy.deepcopy(model), budget=budget, large_kernel_pieces=pieces, mean_as_conv=mean)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        expected, got = model(x), ane(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < FORM_ATOL


def _traced_sizes(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, tuple]]:
    """fx node -> (fp16 bytes, shape) of every tensor the traced graph computes."""
    ep = torch.export.export(module, (x,)).run_decompositions({})
    return {node.name: (2 * node.meta["val"].numel(), tuple(node.meta["val"].shape)) for node in ep.graph.nodes
            if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor)}


def test_every_intermediate_meets_the_budget_and_scores_are_chunked():
    """Windows per chunk and queries per chunk follow the budget; nothing the graph makes is larger."""
    from models.ane.attention import query_chunk_for

    tokens = 64
    assert query_chunk_for(tokens, tokens * tokens * 2) == tokens          # one window's scores fit exactly
    assert query_chunk_for(tokens, tokens * tokens * 2 - 1) == 32           # one byte less: aligned query chunks
    assert query_chunk_for(1024, 8 << 20) == 1024
    model = _tiny()
    # (input H, W; budget; windows in it; windows per score tensor; queries per score tensor)
    for (h, w), budget, count, windows, queries in [((16, 32), 3 * 8192, 8, 3, 64), ((16, 32), 9216, 8, 1, 64),
                                                    ((8, 16), 4096, 2, 1, 32)]:
        ane = ane_form(copy.deepcopy(model), budget=budget)
        attn = ane.model.blocks[0].attn
        assert attn.windows_per_chunk(count) == windows and attn.query_spans[0] == (0, queries)
        sizes = _traced_sizes(ane, torch.rand(1, 3, h, w))
        scores = {shape[2:] for name, (_, shape) in sizes.items() if name.startswith("einsum") and shape[1] == 64}
        assert scores == {(windows, queries)} | ({(count % windows, queries)} if count % windows else set())
        inner = {n: v for n, v in sizes.items() if v[1] not in ((1, 3, h, w), (1, 3, 2 * h, 2 * w))}
        floor = 2 * 32 * h * w  # the 32-channel feature maps cannot be chunked: above the smaller budgets
        assert max(b for b, _ in inner.values()) <= max(budget, floor), sorted(inner.values())[-3:]
    # At a budget of exactly one feature map, the 64-channel FFN hidden maps and the 144 shifts are chunked to it.
    x = torch.rand(1, 3, 32, 64)
    sizes = _traced_sizes(ane_form(copy.deepcopy(model), budget=2 * 32 * 32 * 64), x)
    assert max(b for b, s in sizes.values() if len(s) == 4 and s[1] != 3) == 2 * 32 * 32 * 64


def test_ane_attention_layout_einsums_softmax_and_transposes():
    """Per head: two einsums in the forms coremltools keeps, softmax over axis 1, three transposes per block."""
    ane = ane_form(copy.deepcopy(_tiny()))
    ep = torch.export.export(ane, (torch.rand(1, 3, 16, 16),)).run_decompositions({})
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    einsums = [n.args[0] for n in calls if n.target is torch.ops.aten.einsum.default]
    assert einsums == ["bchq,bkhc->bkhq", "bkhq,bchk->bchq"] * 2  # 2 heads, one chunk
    softmax_axes = [n.args[1] for n in calls if "softmax" in str(n.target)]
    assert softmax_axes == [1, 1]
    transposes = [n for n in calls if n.target in (torch.ops.aten.transpose.int, torch.ops.aten.permute.default)]
    assert len(transposes) == 3, [str(n.target) for n in transposes]


def test_q_scale_is_folded_exactly_and_the_bias_is_dense_bias():
    """q's rows of to_qkv times 1/4 (a power of two: exact, also in fp16); each (head, chunk)
    constant is that slice of ``dense_bias()`` with the keys first; the form reacts to it."""
    model = _tiny()
    ane = ane_form(copy.deepcopy(model), budget=64 * 32 * 2)  # 32-query chunks
    attn = ane.model.blocks[0].attn
    ref = model.blocks[0].attn
    weight, dim = ref.to_qkv.weight, ref.heads * 16
    assert torch.equal(attn.ane_wq, weight[:dim] * 0.25) and torch.equal(attn.ane_wk, weight[dim:2 * dim])
    assert torch.equal(attn.ane_wq.half(), weight[:dim].half() * 0.25)
    dense = ref.dense_bias()[0]
    assert len(attn.query_spans) == 2
    assert torch.equal(attn.bias_constant(1, 1)[0, :, 0], dense[1, 32:64].transpose(0, 1))
    x = torch.rand(1, 3, 8, 16)
    with torch.no_grad():
        before = ane(x)
        attn.ane_bias_h0_q0 += torch.randn_like(attn.ane_bias_h0_q0)
        assert (ane(x) - before).abs().max() > 1e-4


def test_ane_form_takes_the_bias_through_dense_bias():
    """An attention module whose bias comes from elsewhere (FlashBias factors) and has no table:
    the form reads ``dense_bias()``, so it matches the naive back-end on the same module."""
    class FactoredBias(type(_tiny().blocks[0].attn)):
        def dense_bias(self):
            return (self.factor_q @ self.factor_k.transpose(-1, -2)).unsqueeze(0)

    model = _tiny()
    attn = model.blocks[0].attn
    attn.__class__ = FactoredBias
    del attn.relative_position_bias
    gen = torch.Generator().manual_seed(3)
    attn.factor_q = torch.randn(2, 64, 4, generator=gen)
    attn.factor_k = torch.randn(2, 64, 4, generator=gen)
    ane = ane_form(copy.deepcopy(model))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert (ane(x) - model(x)).abs().max() < FORM_ATOL


def test_image_skip_is_a_one_hot_conv_not_an_upsample():
    """The repeat of ESC's image skip as a constant 1x1 conv: equal to repeat_channels in fp32 and
    fp16, and the traced form has no upsampling left."""
    from models.ane import skip_weight
    from models.layers import repeat_channels

    for scale in (2, 3, 4):
        for dtype in (torch.float32, torch.float16):
            x = torch.rand(2, 3, 5, 7).to(dtype)
            got = F.conv2d(x.float(), skip_weight(scale)).to(dtype) if dtype == torch.float16 else F.conv2d(x, skip_weight(scale))
            assert torch.equal(got, repeat_channels(x, scale * scale))
    ane = ane_form(copy.deepcopy(_tiny()))
    ep = torch.export.export(ane, (torch.rand(1, 3, 16, 16),)).run_decompositions({})
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "upsample" in t or "interpolate" in t]
    assert targets.count("aten.pixel_shuffle.default") == 1


@pytest.mark.parametrize("kernel,groups", [(13, 1), (13, 16), (9, 1), (11, 4), (7, 1)])
def test_large_kernel_pieces_are_exact(kernel, groups):
    """A k x k convolution as 7x7 pieces: the same sums, every piece <= 7.

    Tolerance: only the order of the fp32 sums changes (up to 4 partial sums added last), so
    the error stays within a few ulp of the sum of |terms|: 1e-6 x conv(|x|, |w|).
    """
    from models.ane import conv_in_pieces

    gen = torch.Generator().manual_seed(kernel)
    x = torch.randn(2, 16, 20, 23, generator=gen)
    weight = torch.randn(16, 16 // groups, kernel, kernel, generator=gen)
    expected = F.conv2d(x, weight, padding=kernel // 2, groups=groups)
    bound = 1e-6 * F.conv2d(x.abs(), weight.abs(), padding=kernel // 2, groups=groups)
    assert ((conv_in_pieces(x, weight, groups=groups) - expected).abs() <= bound).all()
    ep = torch.export.export(_Pieces(weight, groups), (x,)).run_decompositions({})
    sides = [n.args[1].meta["val"].shape[-1] for n in ep.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert sides and max(sides) <= 7


class _Pieces(nn.Module):
    def __init__(self, weight: torch.Tensor, groups: int) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.groups = groups

    def forward(self, x):
        from models.ane import conv_in_pieces

        return conv_in_pieces(x, self.weight, groups=self.groups)


@pytest.mark.parametrize("size", [(16, 16), (13, 21), (37, 5), (1, 1)])
def test_mean_as_constant_weight_convs(size):
    """The global mean as strided constant-weight convolutions (kernels <= 7, zero padding corrected)."""
    from models.ane import ConstantWeightMean
    from models.ane.contingency import mean_stages

    x = torch.randn(2, 5, *size, generator=torch.Generator().manual_seed(0))
    got = ConstantWeightMean()(x)
    assert got.shape == (2, 5, 1, 1) and torch.allclose(got, x.mean((2, 3), keepdim=True), atol=1e-6)
    stages, ph, pw = mean_stages(*size)
    assert max(max(s) for s in stages) <= 7 and ph >= size[0] and pw >= size[1]


def test_ane_form_refuses_what_it_cannot_do():
    with pytest.raises(ModelOptionError, match="ANE form exists for"):
        from models.ane import AneModel

        AneModel(build(ESCConfig("esc_real", 4, dim=32, pdim=16, kernel_size=7, n_blocks=1, conv_blocks=1,
                                 window_size=8, num_heads=2, exp_ratio=2.0, use_lns=True)))
    with pytest.raises(ModelOptionError, match="tensor budget must be"):
        ane_form(copy.deepcopy(_tiny()), budget=0)
    ane = ane_form(copy.deepcopy(_tiny()), budget=1024)
    with pytest.raises(ModelOptionError, match="one channel of a 24x16 map"):  # 9 shifts of 16x24 = 6.8 KiB
        ane(torch.rand(1, 3, 16, 24))
    with pytest.raises(ModelOptionError, match="AneWindowAttention.forward"):
        ane.model.blocks[0].attn.backend(torch.rand(1, 96, 8, 8), ane.model.blocks[0].attn)
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
    """A tiny ESC in the ANE form, fp16, image I/O, tiles 16x16 and 24x16 (WxH): two functions.

    Budget 32 KiB: above the largest feature map (32 x 16 x 24 fp16 = 24 KiB), so the lint
    passes, and small enough that scores go 4 windows at a time (6 windows: 4 + 2), the
    FFN hidden maps and the shifts in channel groups.
    """
    model = _tiny()
    budget = 32 * 1024
    prepared = ce.prepare_model(model, form="ane", budget=budget)
    config = ce.CoreMLExportConfig(model="esc", scale=2, input_size=None, tiles=[(16, 16), (16, 24)],
                                   precision="fp16", target="iOS18", image_io=True, form="ane", score_budget=budget)
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


def test_runtimes_load_opens_every_function(tile_package):
    """runtimes.load(package, function=...) on a multifunction package (the interpreter here, Core ML
    on macOS); without function= the default function; sizes in messages are WIDTHxHEIGHT."""
    from runtimes import load
    from runtimes.base import RunnerError
    from runtimes.coreml.interpreter import Interpreter

    result, model = tile_package
    with load(str(result.path)) as runner:
        assert runner.function == "tile_16x16" and runner.fixed_shape == (16, 16) and runner.image_io
    with load(str(result.path), function="tile_24x16") as runner:
        assert runner.fixed_shape == (16, 24) and runner.describe()["functions"] == ["tile_16x16", "tile_24x16"]
        x = torch.rand(1, 3, 16, 24)
        with torch.no_grad():
            assert (runner.infer(x) - model(x).clamp(0, 1)).abs().max() < threshold_for("fp16").atol
        with pytest.raises(RunnerError, match=r"takes 24x16 inputs, got 16x16 .*other functions of the package: "
                                              r"tile_16x16"):
            runner.infer(torch.rand(1, 3, 16, 16))
    with pytest.raises(RunnerError, match=r"no function 'tile_8x8'; the package has tile_16x16, tile_24x16"):
        load(str(result.path), function="tile_8x8")
    interp = Interpreter(load_program(result.path, function="tile_24x16"), precision="ane")
    assert interp.image_features == {"input", "output"}  # 8-bit image I/O in ane mode, every function


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
