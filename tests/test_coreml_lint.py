"""The ANE lint's rules from the public record: each one tripped just past its threshold, and
passed just inside it; refusals and advice told apart; every function of a package linted.

Toy modules converted through the export code path (seconds each); a converted package is
linted several times with different limits where the limit is a lint parameter (the
tensor budget), so one conversion shows both sides of the threshold.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from optional_deps import need
from torch import nn

need("coremltools", "coremltools is not installed (pip install 'esc-deploy[all]')")

from export import coreml as ce  # noqa: E402
from export.coreml.lint import (ANE_MAX_AXIS, REFUSE, RULES, TRANSPOSES_PER_BLOCK, WARN,  # noqa: E402
                                lint_package)


def _convert(module: nn.Module, tmp_path: Path, name: str, **cfg) -> ce.ExportResult:
    base = dict(model="toy", scale=2, input_size=(8, 8), precision="fp16", target="iOS18", form="ane")
    base.update(cfg)
    return ce.convert_module(module, ce.CoreMLExportConfig(**base), tmp_path / f"{name}.mlpackage", check=False)


def _rules(report: ce.LintReport, severity: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for v in report.findings:
        if v.severity == severity:
            found.setdefault(v.rule, []).append(v.detail)
    return found


def test_every_rule_names_its_source_and_severity():
    """Refusals and advice are told apart, and each rule's text says where its limit comes from."""
    refuse = {name for name, rule in RULES.items() if rule.severity == REFUSE}
    warn = {name for name, rule in RULES.items() if rule.severity == WARN}
    assert refuse == {"gather", "rank", "dynamic-conv", "flexible-shape", "fp32", "budget", "axis", "kernel"}
    assert warn == {"kernel-size", "broadcast", "upsample", "transposes"}
    for rule in RULES.values():
        assert "Source:" in rule.text or "Advice" in rule.text, rule
    assert "ane-guide" in RULES["axis"].text and "ml-stable-diffusion" in RULES["budget"].text


class _Widen(nn.Module):
    """conv 3 -> 24 channels (an 8x8 map: 3 KiB in fp16), GELU, conv back to 12, pixel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv2d(3, 24, 1)
        self.down = nn.Conv2d(24, 12, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.down(F.gelu(self.up(x))), 2)


def test_budget_refuses_one_byte_past_and_passes_at_the_limit(tmp_path):
    result = _convert(_Widen(), tmp_path, "widen")
    largest = 24 * 8 * 8 * 2
    at_limit = lint_package(result.path, budget=largest)
    assert at_limit.ok and at_limit.largest["main"][0] == largest, at_limit.summary()
    past = lint_package(result.path, budget=largest - 1)
    assert not past.ok and set(past.by_rule()) == {"budget"} and "3.0 KiB" in past.violations[0].detail
    with pytest.raises(ce.AneLintError, match=r"\[budget\].*Source:.*SPLIT_EINSUM_V2"):
        past.raise_if_failed()


class _LongAxis(nn.Module):
    """Pads the flattened 8x8 input to a last axis of ``length``, scales, crops back."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def forward(self, x):
        flat = F.pad(x.reshape(1, 3, 1, 64), (0, self.length - 64)) * 2.0
        y = flat[..., :64].reshape(1, 3, 8, 8)
        return F.interpolate(y, scale_factor=2.0, mode="nearest")


def test_axis_refuses_16385_and_passes_16384(tmp_path):
    inside = _convert(_LongAxis(ANE_MAX_AXIS), tmp_path, "axis_inside").lint
    past = _convert(_LongAxis(ANE_MAX_AXIS + 1), tmp_path, "axis_past").lint
    assert "axis" not in inside.by_rule() and inside.ok, inside.summary()
    assert past.by_rule()["axis"] >= 1 and "16385" in str(past.violations[0].detail), past.summary()


class _Kernels(nn.Module):
    """One convolution per kernel side, summed: 7 (quiet), 8 (advice), 13 (advice), 14 (refused)."""

    def __init__(self, sides: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 12, k, padding=k // 2) for k in sides)

    def forward(self, x):
        out = sum(conv(x)[..., :8, :8] for conv in self.convs)
        return F.pixel_shuffle(out, 2)


def test_kernel_warns_above_7_and_refuses_above_13(tmp_path):
    report = _convert(_Kernels((7, 8, 13, 14)), tmp_path, "kernels", input_size=(16, 16)).lint
    refused, advice = _rules(report, REFUSE), _rules(report, WARN)
    assert refused.get("kernel") == ["kernel 14x14 above 13"], refused
    assert sorted(advice.get("kernel-size", [])) == ["kernel 13x13 above 7", "kernel 8x8 above 7"], advice
    inside = _convert(_Kernels((7, 13)), tmp_path, "kernels_ok", input_size=(16, 16)).lint
    assert inside.ok and inside.warnings_by_rule() == {"kernel-size": 1}, inside.summary()


class _Broadcasts(nn.Module):
    """A run-time (1, 3, 1, 1) mean times the map (advice); the map times itself and a constant (quiet)."""

    def __init__(self, runtime: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.register_buffer("scale", torch.rand(1, 3, 1, 1))

    def forward(self, x):
        y = x * x + x * self.scale
        if self.runtime:
            y = y * x.mean(dim=(2, 3), keepdim=True)
        return F.interpolate(y, scale_factor=2.0, mode="nearest")


def test_broadcast_of_two_runtime_operands_is_advice(tmp_path):
    report = _convert(_Broadcasts(True), tmp_path, "bcast").lint
    assert report.ok and report.warnings_by_rule() == {"broadcast": 1}, report.summary()
    assert "(1, 3, 1, 1)" in report.warnings[0].detail
    quiet = _convert(_Broadcasts(False), tmp_path, "bcast_ok").lint
    assert quiet.ok and not quiet.warnings, quiet.summary()


class _Upsample(nn.Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return F.interpolate(x * 2.0, scale_factor=float(self.factor), mode="nearest")


def test_upsample_other_than_x2_is_advice(tmp_path):
    x2 = _convert(_Upsample(2), tmp_path, "up2").lint
    x3 = _convert(_Upsample(3), tmp_path, "up3", scale=3).lint
    assert x2.ok and not x2.warnings, x2.summary()
    assert x3.ok and x3.warnings_by_rule() == {"upsample": 1} and "by 3 x 3" in x3.warnings[0].detail


class ToyWindowAttention(nn.Module):
    """A class named like an attention block: ``transposes`` alternating HxW transposes, each
    followed by a convolution (so coremltools cannot cancel a pair)."""

    def __init__(self, transposes: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(transposes))

    def forward(self, x):
        for conv in self.convs:
            x = conv(x.transpose(2, 3))
        return x


class _WithAttention(nn.Module):
    def __init__(self, transposes: int) -> None:
        super().__init__()
        self.attn = ToyWindowAttention(transposes)
        self.out = nn.Conv2d(3, 12, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.out(self.attn(x)), 2)


def test_transposes_per_attention_block_advice_past_three(tmp_path):
    inside = _convert(_WithAttention(TRANSPOSES_PER_BLOCK), tmp_path, "t3").lint
    past = _convert(_WithAttention(TRANSPOSES_PER_BLOCK + 1), tmp_path, "t4").lint
    assert inside.block_transposes == {"main": 3} and not inside.warnings, inside.summary()
    assert past.block_transposes == {"main": 4} and past.warnings_by_rule() == {"transposes": 1}, past.summary()
    assert past.ok and past.warnings[0].op == "attn"
    unattributed = lint_package(past_path := tmp_path / "t4.mlpackage")
    assert not unattributed.block_transposes and unattributed.transposes == {"main": 4}, past_path


class _GatherWhenWide(nn.Module):
    """Clean at 8x8; at 16x8 (WxH) it reorders columns with an index gather."""

    def forward(self, x):
        if x.shape[-1] > 8:
            x = x.index_select(3, torch.arange(x.shape[-1] - 1, -1, -1))
        return F.interpolate(x * 2.0, scale_factor=2.0, mode="nearest")


def test_lint_checks_every_function_of_a_multifunction_package(tmp_path):
    """Issue 22: the second function violates, the first does not; the lint must see it."""
    result = _convert(_GatherWhenWide(), tmp_path, "second", input_size=None, tiles=[(8, 8), (8, 16)])
    assert result.lint.functions == ["tile_8x8", "tile_16x8"]
    gathers = [v for v in result.lint.violations if v.rule == "gather"]
    assert gathers and {v.function for v in gathers} == {"tile_16x8"}, result.lint.summary()
    with pytest.raises(ce.AneLintError, match=r"\[gather\] tile_16x8"):
        ce.convert_module(_GatherWhenWide(), result.config, tmp_path / "refused.mlpackage")
    assert not (tmp_path / "refused.mlpackage").exists()
