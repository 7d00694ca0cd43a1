"""fp16 safety from real pictures, for every exporter (ONNX fp16, TensorRT fp16, Core ML).

Why: whether a network overflows fp16 depends on the activations real pictures produce,
not on the weights alone, and the values that overflow first are often *inside* an op:
LayerNorm's squared deviations, the running sum of a convolution or matmul, the sum a
mean divides. This module runs the fp32 PyTorch model on pictures and records, per
module, the largest magnitude of:

* ``output of <op>``: every floating result of a torch function inside the module;
* ``square``: ``t * t`` (the squared deviations of :class:`models.layers.ChannelLayerNorm`);
* ``accumulation``: the largest partial sum a convolution or matmul can reach in any
  order (``conv(|x|, |w|)``, ``|a| @ |b|``), what an fp16 accumulator must hold;
* ``sum before mean`` / ``sum of squares``: what a mean adds up before it divides.

A record above ``65504 / headroom`` is a :class:`Fp16Problem`. :func:`make_fp16_safe`
fixes what can be fixed exactly and refuses the rest by name:

* a LayerNorm whose input is too large gets its input multiplied by ``a = 2**-k`` and its
  epsilon by ``a**2``. That is exact: with ``x' = a x``, ``mean' = a mean``,
  ``var' = a**2 var``, so ``(x' - mean') / sqrt(var' + a**2 eps) = (x - mean) / sqrt(var + eps)``;
  a power of two scales fp16 and fp32 values without rounding (above the subnormal range);
* anything else is kept in fp32 when the caller says the target allows it
  (``allow_fp32=True``: ONNX Runtime and TensorRT can pin layers to fp32, the report lists
  them in :attr:`Fp16SafetyReport.keep_fp32`), otherwise :class:`Fp16UnsafeError` names
  each layer and the value it reached.

>>> safe_model, report = make_fp16_safe(model, pictures)   # doctest: +SKIP
>>> print(report.format())                                 # doctest: +SKIP
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ESCError
from .layers import ChannelLayerNorm

__all__ = [
    "FP16_MAX", "Fp16Problem", "Fp16SafetyReport", "Fp16UnsafeError", "PrescaledLayerNorm", "fp16_safety_report",
    "make_fp16_safe", "record_ranges",
]

#: The largest finite float16 value.
FP16_MAX = 65504.0
#: The smallest positive float16 value (subnormal): a LayerNorm epsilon below it becomes 0.
FP16_TINY = 2.0 ** -24

_CONV = {torch.conv2d, F.conv2d}
_MATMUL = {torch.matmul, torch.bmm, torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.bmm}
_MEAN = {torch.mean, torch.Tensor.mean}
_MUL = {torch.mul, torch.Tensor.__mul__, torch.Tensor.mul}


class Fp16UnsafeError(ESCError, ValueError):
    """The model overflows fp16 on real pictures where no exact fix applies."""


@dataclass(frozen=True)
class Fp16Problem:
    """One recorded magnitude above the fp16 limit (``FP16_MAX / headroom``)."""

    layer: str
    quantity: str
    max_abs: float
    limit: float

    def describe(self) -> str:
        value = "inf/nan" if not math.isfinite(self.max_abs) else f"{self.max_abs:.4g}"
        return f"{self.layer or '<model>'}: {self.quantity} reaches {value} (> {self.limit:.4g})"


@dataclass
class Fp16SafetyReport:
    """Recorded ranges, the problems among them, and what :func:`make_fp16_safe` did about them."""

    ranges: dict[tuple[str, str], float]
    problems: list[Fp16Problem]
    headroom: float
    pictures: int
    rescaled: dict[str, float] = field(default_factory=dict)  # LayerNorm -> input scale applied
    notes: list[str] = field(default_factory=list)
    keep_fp32: list[str] = field(default_factory=list)  # layers the exporter must keep in fp32

    @property
    def safe(self) -> bool:
        """No problem left, or every one pinned to fp32."""
        return all(p.layer in self.keep_fp32 for p in self.problems)

    def largest(self, n: int = 5) -> list[tuple[str, str, float]]:
        """The ``n`` largest recorded magnitudes: (layer, quantity, value)."""
        items = sorted(self.ranges.items(), key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)
        return [(layer, qty, v) for (layer, qty), v in items[:n]]

    def format(self) -> str:
        """A short text report: verdict, problems, fixes, the largest values seen."""
        verdict = "fp16-safe" if self.safe else "NOT fp16-safe"
        lines = [f"fp16 safety ({self.pictures} picture(s), headroom x{self.headroom:g}): {verdict}"]
        lines += [f"  problem  {p.describe()}" for p in self.problems]
        lines += [f"  fixed    {name}: input x 2^{round(math.log2(a))}, epsilon x 2^{round(2 * math.log2(a))}"
                  for name, a in self.rescaled.items()]
        lines += [f"  fp32     {name}" for name in self.keep_fp32]
        lines += [f"  note     {n}" for n in self.notes]
        lines += [f"  largest  {layer or '<model>'} {qty}: {v:.4g}" for layer, qty, v in self.largest()]
        return "\n".join(lines)


class PrescaledLayerNorm(ChannelLayerNorm):
    """A :class:`ChannelLayerNorm` that normalises ``input_scale * x`` with epsilon ``eps * input_scale**2``.

    Computes the same function as the LayerNorm it replaces (see the module docstring)
    while its statistics stay ``input_scale**2`` times smaller. Keeps the parameter names,
    so state dicts and the deploy-time affine fold work unchanged.
    """

    def __init__(self, norm: ChannelLayerNorm, input_scale: float) -> None:
        dim = norm.weight.numel() if norm.weight is not None else 1
        super().__init__(dim, eps=norm.eps * input_scale ** 2)
        self.weight, self.bias = norm.weight, norm.bias
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_scale)


class _RangeRecorder(TorchFunctionMode):
    """Sees every torch function call; attributes magnitudes to the innermost running module."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = [""]
        self.ranges: dict[tuple[str, str], float] = {}
        self.squares: set[int] = set()  # ids of tensors that are t * t

    def note(self, quantity: str, value: torch.Tensor | float) -> None:
        v = (float(torch.linalg.vector_norm(value.detach(), math.inf)) if isinstance(value, torch.Tensor)
             else float(value))
        if math.isnan(v):
            v = math.inf
        key = (self.stack[-1], quantity)
        self.ranges[key] = max(self.ranges.get(key, 0.0), v)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.numel() == 0:
            return out
        name = getattr(func, "__name__", str(func))
        if func in _MUL and len(args) == 2 and args[0] is args[1]:
            self.note("square", out)
            self.squares.add(id(out))
            return out
        self.note(f"output of {name}", out)
        if func in _CONV:
            x, w = args[0], args[1]
            rest = list(args[3:])
            self.note("accumulation", F.conv2d(x.abs(), w.abs(), None, *rest, **{k: v for k, v in kwargs.items()
                                                                                    if k != "bias"}))
        elif func in _MATMUL:
            self.note("accumulation", torch.matmul(args[0].abs(), args[1].abs()))
        elif func in _MEAN and isinstance(args[0], torch.Tensor):
            x = args[0]
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            count = x.numel() // max(out.numel(), 1) if dims is not None else x.numel()
            kind = "sum of squares" if id(x) in self.squares else "sum before mean"
            self.note(kind, x.abs().mean(dim=dims, keepdim=True) * count if dims is not None else x.abs().sum())
        elif func is F.adaptive_avg_pool2d:
            self.note("sum before mean", args[0].abs().sum(dim=(-2, -1)))
        return out


def _names_hooks(model: nn.Module, recorder: _RangeRecorder) -> list:
    handles = []
    for name, module in model.named_modules():
        def push(_m, _a, name=name):
            recorder.stack.append(name)

        def pop(_m, _a, _o):
            recorder.stack.pop()
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop))
    return handles


@torch.no_grad()
def record_ranges(model: nn.Module, pictures: Iterable[torch.Tensor],
                  progress: bool = True) -> tuple[dict[tuple[str, str], float], int]:
    """Run ``model`` in fp32 on each ``(1, 3, h, w)`` picture; the largest magnitude per (layer, quantity).

    Pictures are run one at a time (memory is one forward pass); returns the ranges and
    how many pictures were seen.
    """
    from tqdm import tqdm

    recorder = _RangeRecorder()
    handles = _names_hooks(model, recorder)
    count = 0
    try:
        for x in tqdm(pictures, desc="fp16 safety: pictures", unit="picture", disable=not progress, leave=False):
            if x.ndim != 4 or x.shape[1] != 3:
                raise Fp16UnsafeError(f"fp16 safety needs (1, 3, h, w) RGB pictures in [0, 1]; got shape "
                                      f"{tuple(x.shape)} (read pictures with runtimes.imageio.read_image + to_tensor)")
            with recorder:
                model(x.float())
            recorder.squares.clear()
            count += 1
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise Fp16UnsafeError("fp16 safety needs at least one picture (e.g. ../shared/data/Set5/LR_bicubic/X4)")
    return recorder.ranges, count


def fp16_safety_report(model: nn.Module, pictures: Iterable[torch.Tensor], headroom: float = 2.0,
                       progress: bool = True) -> Fp16SafetyReport:
    """Record ranges on ``pictures`` and list every magnitude above ``FP16_MAX / headroom``.

    ``headroom`` leaves room for pictures brighter or busier than the ones seen (2 = a
    value must stay below 32752).
    """
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1 (a safety factor below the fp16 maximum), got {headroom}")
    was_training = model.training
    model.eval()
    try:
        ranges, count = record_ranges(model, pictures, progress)
    finally:
        model.train(was_training)
    limit = FP16_MAX / headroom
    problems = [Fp16Problem(layer, qty, v, limit) for (layer, qty), v in sorted(ranges.items()) if not v <= limit]
    return Fp16SafetyReport(ranges, problems, headroom, count)


def _input_scale(problems: list[Fp16Problem]) -> float:
    """The power of two ``a`` that brings every problem of one LayerNorm under its limit."""
    k = 0
    for p in problems:
        if not math.isfinite(p.max_abs):
            return 0.0
        power = 2 if p.quantity in ("square", "sum of squares") else 1
        k = max(k, math.ceil(math.log2(p.max_abs / p.limit) / power))
    return 2.0 ** -k


def make_fp16_safe(model: nn.Module, pictures: Iterable[torch.Tensor], headroom: float = 2.0,
                   allow_fp32: bool = False, progress: bool = True) -> tuple[nn.Module, Fp16SafetyReport]:
    """A copy of ``model`` that stays within fp16 on ``pictures``, and the report that shows it.

    LayerNorms that overflow are replaced by :class:`PrescaledLayerNorm` (exact); the copy is
    measured again and that second report is returned (with ``rescaled`` filled in). Any
    problem left is pinned to fp32 when ``allow_fp32`` (listed in ``keep_fp32``), else
    :class:`Fp16UnsafeError` names it. The caller's model is not changed.
    """
    pictures = list(pictures)
    first = fp16_safety_report(model, pictures, headroom, progress)
    safe = copy.deepcopy(model)
    modules = dict(safe.named_modules())
    rescaled: dict[str, float] = {}
    notes: list[str] = []
    by_layer: dict[str, list[Fp16Problem]] = {}
    for p in first.problems:
        by_layer.setdefault(p.layer, []).append(p)
    for layer, problems in by_layer.items():
        norm = modules.get(layer)
        if type(norm) is not ChannelLayerNorm:
            continue
        scale = _input_scale(problems)
        if scale == 0.0:
            continue  # already non-finite in fp32: no rescaling helps
        parent_name, _, attr = layer.rpartition(".")
        setattr(modules[parent_name] if parent_name else safe, attr, PrescaledLayerNorm(norm, scale))
        rescaled[layer] = scale
        if norm.eps * scale ** 2 < FP16_TINY:
            notes.append(f"{layer}: epsilon {norm.eps:g} x {scale ** 2:g} is below fp16's smallest value and is 0 in "
                         f"fp16; the normalisation then divides by the standard deviation alone, which differs "
                         f"only where a pixel's channel variance is within a few epsilons of 0 (this layer's "
                         f"squared deviations reach {max(p.max_abs for p in problems):.3g})")
    report = fp16_safety_report(safe, pictures, headroom, progress) if rescaled else first
    report.rescaled, report.notes = rescaled, notes
    if report.problems:
        if not allow_fp32:
            listed = "; ".join(p.describe() for p in report.problems)
            raise Fp16UnsafeError(
                f"the model overflows fp16 on these pictures and no exact rescaling applies: {listed}. Export in "
                f"fp32, or keep these layers in fp32 where the target allows it (allow_fp32=True).")
        report.keep_fp32 = sorted({p.layer for p in report.problems})
    return safe, report
