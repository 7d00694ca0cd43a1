"""Upstream's FlashBias checkpoints: recognised, strictly loaded, reproduced; and the one FlashBias path.

``../shared/golden_fb`` holds official-format FlashBias checkpoints (``flashbias_q`` /
``flashbias_k`` of shape (heads, w^2, 48) per block, no bias table) with ``sr`` made by
upstream's code with the attention arithmetic in float32, and ``sr_bf16`` as upstream runs it
(q', k', v' in bfloat16). A table checkpoint run through the ``flashbias`` back-end, and the
same checkpoint converted to FlashBias factors (:func:`models.flashbias.to_flashbias`), are one
computation: their outputs agree.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import SHARED_DIR, golden_index

from models import AttentionBackendError, CheckpointError, ModelOptionError, create_model, load_model
from models.attention.factored import factored_sdpa, factorise_bias
from models.flashbias import to_flashbias
from validation.compare import threshold_for

TOL = threshold_for("fp32").atol   # 1e-4: what every golden case is held to
GOLDEN_FB = SHARED_DIR / "golden_fb"
CASES = list(golden_index("golden_fb").values())


@pytest.fixture(scope="module", params=CASES, ids=[c["name"] for c in CASES])
def case(request) -> dict:
    return request.param


@pytest.fixture(scope="module")
def io(case) -> dict:
    return torch.load(GOLDEN_FB / f"{case['name']}.io.pt", weights_only=True)


class Outputs:
    """Each (form, attention) forward of a golden case once: the golden forwards dominate this file."""

    def __init__(self, case: dict, io: dict) -> None:
        self.case, self.io = case, io
        self.cache: dict[tuple[bool, str, str], torch.Tensor] = {}
        self.models: dict[bool, torch.nn.Module] = {}

    def model(self, deploy: bool) -> torch.nn.Module:
        if deploy not in self.models:
            self.models[deploy] = load_model(GOLDEN_FB / f"{self.case['name']}.pth", deploy=deploy)
        return self.models[deploy]

    def __call__(self, deploy: bool, attention: str, precision: str = "auto") -> torch.Tensor:
        key = (deploy, attention, precision)
        if key not in self.cache:
            model = self.model(deploy)
            options = {"precision": precision} if attention == "flashbias" else {}
            model.set_attention(attention, **options)
            with torch.no_grad():
                self.cache[key] = model(self.io["lr"])
        return self.cache[key]


@pytest.fixture(scope="module")
def outputs(case: dict, io: dict) -> Outputs:
    return Outputs(case, io)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("deploy", [False, True], ids=["train-form", "deployed"])
def test_golden_flashbias_reproduced(case: dict, io: dict, outputs: Outputs, deploy: bool) -> None:
    model = outputs.model(deploy)
    d = model.descriptor
    assert (d.variant, d.scale, d.exact_variant, d.deployed) == (case["variant"], case["scale"], True, deploy)
    assert d.bias == f"flashbias rank {case['flashbias_rank']}"
    assert model.config.flashbias_rank == case["flashbias_rank"] == case["official_kwargs"]["flashbias_rank"]
    assert model.num_params() == case["params"]
    # sdpa: the mask-free path every export takes; naive: the dense product, written out.
    errors = {attention: _max_abs(outputs(deploy, attention), io["sr"]) for attention in ("sdpa", "naive")}
    print(f"{case['name']} {'deployed' if deploy else 'train form'}: max abs vs sr "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert all(err < TOL for err in errors.values()), errors


def test_bf16_attention_is_what_upstream_runs(case: dict, io: dict, outputs: Outputs) -> None:
    """``precision="bf16"`` is upstream's arithmetic: nearer ``sr_bf16`` than the fp32 path is."""
    fp32_to_bf16 = _max_abs(outputs(True, "sdpa"), io["sr_bf16"])
    ours_to_bf16 = _max_abs(outputs(True, "flashbias", "bf16"), io["sr_bf16"])
    print(f"{case['name']}: vs sr_bf16: fp32 attention {fp32_to_bf16:.2e}, bf16 attention {ours_to_bf16:.2e} "
          f"(upstream's own sr vs sr_bf16: {case['sr_vs_sr_bf16_max_abs']:.2e})")
    assert fp32_to_bf16 == pytest.approx(case["sr_vs_sr_bf16_max_abs"], rel=0.05)
    assert ours_to_bf16 < 0.5 * fp32_to_bf16


def test_fused_kernel_and_a_run_time_rank_are_refused_with_the_fix(case: dict, io: dict) -> None:
    model = load_model(GOLDEN_FB / f"{case['name']}.pth", attention="fused")
    with pytest.raises(AttentionBackendError, match="use attention='sdpa'"), torch.no_grad():
        model(io["lr"][..., :8, :8])
    model.set_attention("flashbias", rank=16)
    with pytest.raises(ModelOptionError, match="to_flashbias.py --rank 16"), torch.no_grad():
        model(io["lr"][..., :8, :8])


@pytest.mark.gpu
def test_flashbias_on_cuda_takes_the_flash_kernel(case: dict, io: dict, no_tf32) -> None:
    """fp32 on CUDA reproduces ``sr``; bf16 with only the flash kernel allowed runs (the padded,
    mask-free q'/k'/v' are what it accepts) and lands as far from ``sr`` as upstream's own bf16 run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = load_model(GOLDEN_FB / f"{case['name']}.pth", device="cuda")
    lr = io["lr"].cuda()
    with torch.no_grad():
        fp32 = model(lr).cpu()
        model.set_attention("flashbias", precision="bf16")
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            bf16 = model(lr).cpu()
    err, to_sr, to_bf16 = _max_abs(fp32, io["sr"]), _max_abs(bf16, io["sr"]), _max_abs(bf16, io["sr_bf16"])
    print(f"{case['name']} on CUDA: fp32 vs sr {err:.2e}; bf16 flash vs sr {to_sr:.2e}, vs sr_bf16 {to_bf16:.2e} "
          f"(upstream's sr vs sr_bf16 {case['sr_vs_sr_bf16_max_abs']:.2e})")
    assert err < TOL
    assert to_sr < 2 * case["sr_vs_sr_bf16_max_abs"]


# -- every back-end on a small FlashBias model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flashbias(tiny_checkpoint) -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny ESC (8x8 windows) converted at rank 5, and an input that pads both sides."""
    converted, _ = to_flashbias(tiny_checkpoint, rank=5)
    x = torch.rand(2, 3, 13, 19, generator=torch.Generator().manual_seed(0))
    return load_model(converted, attention="naive"), x


@pytest.mark.parametrize("attention", ["sdpa", "flashbias", "coreml", "flex"])
def test_every_mask_free_form_agrees_with_the_dense_bias(tiny_flashbias, attention: str) -> None:
    """sdpa/flashbias (one function), Core ML's form (no explicit scale), eager FlexAttention."""
    model, x = tiny_flashbias
    options = {"allow_cpu": True, "compile": False} if attention == "flex" else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # eager FlexAttention on CPU warns that it is slow
        model.set_attention("naive")
        reference = model(x)
        model.set_attention(attention, **options)
        got = model(x)
    assert _max_abs(got, reference) < 1e-5


# -- near misses ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fb_state() -> dict[str, torch.Tensor]:
    name = next(c["name"] for c in CASES if c["variant"] == "esc")
    return torch.load(GOLDEN_FB / f"{name}.pth", weights_only=True)["params_ema"]


def test_one_factor_missing_is_named(fb_state: dict, tmp_path) -> None:
    sd = {k: v for k, v in fb_state.items() if k != "blocks.0.attn.flashbias_k"}
    with pytest.raises(CheckpointError, match="has blocks.0.attn.flashbias_q but not blocks.0.attn.flashbias_k"):
        load_model(sd)


def test_factor_shapes_that_disagree_are_named(fb_state: dict) -> None:
    sd = dict(fb_state)
    sd["blocks.0.attn.flashbias_k"] = sd["blocks.0.attn.flashbias_k"][..., :40]
    with pytest.raises(CheckpointError, match=r"flashbias_q \(4, 1024, 48\) and flashbias_k \(4, 1024, 40\)"):
        load_model(sd)


def test_table_and_factors_together_are_refused(fb_state: dict) -> None:
    sd = dict(fb_state, **{"blocks.0.attn.relative_position_bias": torch.zeros(4, 63 * 63)})
    with pytest.raises(CheckpointError, match="both a relative-position table"):
        load_model(sd)


def test_a_later_block_without_factors_is_a_strict_load_error(fb_state: dict) -> None:
    sd = {k: v for k, v in fb_state.items() if not k.startswith("blocks.2.attn.flashbias")}
    with pytest.raises(CheckpointError, match=r"2 missing key\(s\) \(blocks\.2\.attn\.flashbias_q"):
        load_model(sd)


def test_no_bias_at_all_names_both_forms(fb_state: dict) -> None:
    sd = {k: v for k, v in fb_state.items() if not k.startswith("blocks.0.attn.flashbias")}
    with pytest.raises(CheckpointError, match="neither a relative-position table .* nor FlashBias factors"):
        load_model(sd)


# -- one path: the SVD factors of a table ---------------------------------------------------------------
def test_svd_split_is_upstreams_and_full_rank_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(2, 64, 64, generator=gen)
    f_q, f_k, report = factorise_bias(bias, rank=64)
    assert report.rank == 64 and report.max_abs_error < 1e-9
    assert _max_abs(f_q @ f_k.transpose(-2, -1), bias) < 1e-5
    # sqrt(S) on both sides: the two factors carry the same column norms.
    assert torch.allclose(f_q.norm(dim=-2), f_k.norm(dim=-2), rtol=1e-5)
    _, _, low = factorise_bias(bias, rank=8)
    assert low.rank == 8 and low.relative_fro_error > 0.5   # random: far from low rank


def test_factored_sdpa_equals_biased_attention() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 64, 16, generator=gen) for _ in range(3))
    f_q, f_k = torch.randn(1, 2, 64, 10, generator=gen), torch.randn(1, 2, 64, 10, generator=gen)
    scale = 0.25
    expected = torch.softmax(q @ k.transpose(-2, -1) * scale + f_q @ f_k.transpose(-2, -1), -1) @ v
    got = factored_sdpa(q, k, v, f_q / scale, f_k, scale)
    assert _max_abs(got, expected) < 1e-5


def test_converted_checkpoint_is_the_flashbias_backend(tiny_checkpoint) -> None:
    """A table checkpoint at rank r through ``attention='flashbias'`` == the same checkpoint converted."""
    table_sd = torch.load(tiny_checkpoint, weights_only=True)["params_ema"]
    converted, reports = to_flashbias(table_sd, rank=12)
    assert not any(k.endswith("relative_position_bias") for k in converted)
    assert converted["blocks.0.attn.flashbias_q"].shape == (1, 64, 12) and len(reports) == 1
    assert set(converted) - {k for k in converted if "flashbias" in k} == {
        k for k in table_sd if not k.endswith("relative_position_bias")}
    fb_model = load_model(converted, deploy=True)
    assert fb_model.descriptor.bias == "flashbias rank 12" and fb_model.descriptor.exact_variant is False
    table_model = load_model(table_sd, attention="flashbias", rank=12, deploy=True)
    x = torch.rand(1, 3, 11, 17, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = fb_model(x), table_model(x)
    assert _max_abs(a, b) < 1e-6
    assert table_model.blocks[0].attn.lowrank_report["relative_fro_error"] == pytest.approx(
        reports[0].relative_fro_error, rel=1e-6)
    # Full rank (w^2 = 64 tokens): the bias itself, so the table model's own output.
    full, _ = to_flashbias(table_sd, rank=64)
    with torch.no_grad():
        exact = load_model(table_sd, attention="naive")(x)
        assert _max_abs(load_model(full)(x), exact) < 1e-5


def test_conversion_refuses_what_has_no_table(fb_state: dict, tiny_checkpoint) -> None:
    with pytest.raises(CheckpointError, match="already holds FlashBias factors"):
        to_flashbias(fb_state, rank=48)
    with pytest.raises(ModelOptionError, match=r"between 1 and 64 \(window 8: 64 tokens\), got 65"):
        to_flashbias(tiny_checkpoint, rank=65)
    assert to_flashbias(tiny_checkpoint, rank=64)[1][0].rank == 64     # the largest rank is accepted


def test_every_esc_variant_has_a_flashbias_form_that_is_recognised() -> None:
    """Built with factors, saved, and loaded back: the loader finds variant, scale and rank in the keys."""
    for name in ("esc", "esc_light", "esc_fp", "esc_real", "esc_xl"):
        with pytest.warns(UserWarning, match="random weights"):
            model = create_model(name, 4, flashbias_rank=16)
        loaded = load_model({"params_ema": model.state_dict()})
        d = loaded.descriptor
        assert (d.bias, d.variant, d.scale, d.exact_variant) == ("flashbias rank 16", name, 4, True)
    with pytest.raises(ModelOptionError, match="FlashBias factors apply to the ESC family"):
        create_model("esc_rib", 4, flashbias_rank=16)
