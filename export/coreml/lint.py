"""The Neural Engine lint: what in a saved ML program would keep it off the ANE, or slow it there.

Why our own: coremltools accepts (and Core ML runs) programs that the ANE compiler
quietly hands to the GPU or CPU. The lint reads the saved package, every function of a
multifunction package, and names each offending op and, where the exporter passed its
:func:`source_map`, the model code the op came from.

Each rule (:data:`RULES`) carries its source in its text and a severity: ``refuse`` rules
fail the export (what the public record says the ANE rejects, or what this toolkit
promises: fixed shapes, fp16, the tensor budget); ``warn`` rules are advice (what the
record says is slow or uncertain on the ANE), printed in the summary, never fatal. The
record is thin and partly third-party: a Mac run (``benchmarks/mac_evidence.py``, whose
compute plan says where each op runs) is the check that counts.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from models.ane.budget import DEFAULT_BUDGET_BYTES, format_bytes
from runtimes.coreml.constexpr import COMPILE_TIME_OPS
from runtimes.coreml.reader import DTYPES, MILOp, MILProgram, load_program

from .options import PackageCheckError

__all__ = ["ANE_MAX_AXIS", "ANE_MAX_KERNEL", "ANE_MAX_RANK", "ANE_WARN_KERNEL", "REFUSE", "RULES", "TRANSPOSES_PER_BLOCK",
           "WARN", "AneLintError", "LintReport", "Rule", "TraceMaps", "Violation", "attention_block_map",
           "function_names", "lint_package", "lint_program", "source_map", "trace_maps"]

REFUSE, WARN = "refuse", "warn"
ANE_MAX_RANK = 4
ANE_MAX_AXIS = 16384
ANE_MAX_KERNEL = 13
ANE_WARN_KERNEL = 7
#: Transposes per attention block the ANE form needs: window partition, k, window merge.
TRANSPOSES_PER_BLOCK = 3
GATHER_OPS = frozenset({"gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis"})
CONV_OPS = frozenset({"conv", "conv_transpose"})
ELEMENTWISE_BINARY = frozenset({"add", "sub", "mul", "real_div", "maximum", "minimum", "pow", "floor_div",
                                "equal", "not_equal", "less", "less_equal", "greater", "greater_equal"})
RESAMPLE_OPS = frozenset({"upsample_nearest_neighbor", "upsample_bilinear", "resize_nearest_neighbor",
                          "resize_bilinear", "resize"})
#: Ops that only move data between the I/O dtype and the compute dtype.
IO_CAST_OPS = frozenset({"cast"})
_DTYPE_SUFFIX = re.compile(r"_cast_fp(16|32)$")
#: Module classes whose ops count as one attention block (the ``transposes`` rule).
ATTENTION_CLASS_SUFFIX = "WindowAttention"


@dataclass(frozen=True)
class Rule:
    """One lint rule: its name, ``refuse`` or ``warn``, and what it checks, why and on whose word."""

    name: str
    severity: str
    text: str


_APPLE_ARTICLE = "Apple, 'Deploying Transformers on the Apple Neural Engine' (machinelearning.apple.com, 2022)"
_ANE_GUIDE = "ane-guide.readthedocs.io ch. 17 'Model-design rules' (limits measured on an M1 by sweeping shapes)"
_HOLLANCE = "hollance/neural-engine docs/unsupported-layers.md"
RULES: dict[str, Rule] = {rule.name: rule for rule in (
    Rule("gather", REFUSE, f"gather/scatter ops (index math) run off the Neural Engine. Source: {_HOLLANCE} "
                           f"lists gather among the layers known not to run on the ANE."),
    Rule("rank", REFUSE, f"run-time tensors above rank {ANE_MAX_RANK}. Source: {_APPLE_ARTICLE}: the most conducive "
                         f"data format for the ANE is 4D and channels-first, (B, C, 1, S)."),
    Rule("dynamic-conv", REFUSE, "a convolution whose weights are computed in the graph. Source: this toolkit's ANE "
                                 "contract (issue 11); the Orion paper (arXiv 2603.06728) describes ANE programs with "
                                 "their weights baked in at compile time."),
    Rule("flexible-shape", REFUSE, "an input with enumerated, ranged or unknown sizes. Source: this toolkit's ANE "
                                   "contract (one static function per tile); ml-stable-diffusion converts every "
                                   "Neural Engine model with fixed shapes."),
    Rule("fp32", REFUSE, f"an op computing in fp32, or an fp32 constant cast to fp16 at every prediction (only the "
                         f"casts of the program's inputs and outputs may touch fp32). Source: {_ANE_GUIDE}: the "
                         f"datapath is fp16; fp32 annotations do not reach the silicon."),
    Rule("budget", REFUSE, f"a run-time intermediate larger than the tensor budget (default "
                           f"{format_bytes(DEFAULT_BUDGET_BYTES)}; the program's inputs, outputs and their I/O "
                           f"casts are the caller's buffers and not counted). Source: {_APPLE_ARTICLE}, principle 2 "
                           f"'chunking large intermediate tensors'; ml-stable-diffusion's SPLIT_EINSUM_V2 cuts the "
                           f"queries in chunks of 512; {_ANE_GUIDE}: an operand above ~2 MB tiles and streams from "
                           f"DRAM."),
    Rule("axis", REFUSE, f"a tensor axis longer than {ANE_MAX_AXIS}. Source: {_ANE_GUIDE}: width and height at most "
                         f"16384, one element past rejects at compile time; gist antmikinka/715499ae: 'the ANE can "
                         f"only load tensors with a dimension size of at most 16,384'."),
    Rule("kernel", REFUSE, f"a convolution kernel side above {ANE_MAX_KERNEL}. Source: {_ANE_GUIDE}: 'convolution "
                           f"kernel width is capped at 13'."),
    Rule("kernel-size", WARN, f"a convolution kernel side above {ANE_WARN_KERNEL} (up to {ANE_MAX_KERNEL}). Advice, "
                              f"not a measured limit: issue 23 (ESC's 13x13 convolutions are 41% of its MACs); "
                              f"export with --large-kernel-pieces (exact 7x7 pieces) if the compute plan shows "
                              f"them off the ANE."),
    Rule("broadcast", WARN, f"an element-wise op whose two run-time operands differ in shape (a broadcast "
                            f"computed at run time; constants are not counted). Source: {_HOLLANCE}: Core ML 3's "
                            f"broadcastable layers fell back to CPU/GPU. Advice only: Apple's own ANE reference "
                            f"(ml-ane-transformers: LayerNormANE, the key-mask add) broadcasts at run time."),
    Rule("upsample", WARN, f"resampling by a factor other than 2. Source: x2 is the factor the public record shows "
                           f"on the ANE (ml-stable-diffusion's VAE decoder upsamples by 2; {_HOLLANCE} saw "
                           f"upsampling run, factor unstated); other factors are unverified."),
    Rule("transposes", WARN, f"more than {TRANSPOSES_PER_BLOCK} transposes in one attention block (window "
                             f"partition, k, window merge). Source: {_APPLE_ARTICLE}, principle 3 'minimizing memory "
                             f"copies': avoid transposes and reshapes; ml-ane-transformers transposes k once per "
                             f"block. Checked where the exporter passes its source map."),
)}


class AneLintError(PackageCheckError):
    """The package is meant for the Neural Engine but has ops that keep it off it."""


@dataclass(frozen=True)
class Violation:
    """One finding: which rule, where (function, op), what, and the model code it came from."""

    rule: str
    function: str
    op: str
    op_type: str
    detail: str
    source: str | None

    @property
    def severity(self) -> str:
        return RULES[self.rule].severity

    def __str__(self) -> str:
        where = f" <- {self.source}" if self.source else ""
        return f"[{self.rule}] {self.function}:{self.op_type} '{self.op}': {self.detail}{where}"


@dataclass
class LintReport:
    """Per-function op histograms, ranks, sizes, and the findings (refusals and warnings)."""

    functions: list[str]
    histogram: Counter
    max_rank: int
    findings: list[Violation] = field(default_factory=list)
    budget: int = DEFAULT_BUDGET_BYTES
    #: function -> (bytes, op name, shape) of its largest counted intermediate
    largest: dict[str, tuple[int, str, tuple]] = field(default_factory=dict)
    #: function -> number of ``transpose`` ops
    transposes: dict[str, int] = field(default_factory=dict)
    #: function -> worst transposes in one attention block (absent: no source map to tell blocks apart)
    block_transposes: dict[str, int] = field(default_factory=dict)

    @property
    def violations(self) -> list[Violation]:
        """Findings of ``refuse`` rules: any one fails the export."""
        return [v for v in self.findings if v.severity == REFUSE]

    @property
    def warnings(self) -> list[Violation]:
        """Findings of ``warn`` rules: advice."""
        return [v for v in self.findings if v.severity == WARN]

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_rule(self) -> Counter:
        return Counter(v.rule for v in self.violations)

    def warnings_by_rule(self) -> Counter:
        return Counter(v.rule for v in self.warnings)

    def summary(self) -> str:
        gathers = sum(self.histogram.get(t, 0) for t in GATHER_OPS)
        biggest = max(self.largest.values(), default=(0, "", ()))
        head = (f"{sum(self.histogram.values())} ops in {len(self.functions)} function(s), max rank {self.max_rank}, "
                f"{gathers} gather(s), largest intermediate {format_bytes(biggest[0])} (budget "
                f"{format_bytes(self.budget)}), transposes {', '.join(f'{k} {v}' for k, v in self.transposes.items())}")
        advice = ", ".join(f"{rule} x{n}" for rule, n in sorted(self.warnings_by_rule().items()))
        advice = f"; advice: {advice}" if advice else "; no advice"
        if self.ok:
            return f"passed: {head}, 0 violations{advice}"
        rules = ", ".join(f"{rule} x{n}" for rule, n in sorted(self.by_rule().items()))
        return f"FAILED: {len(self.violations)} violation(s) ({rules}); {head}{advice}"

    def raise_if_failed(self) -> None:
        if not self.ok:
            listed = "; ".join(str(v) for v in self.violations[:12])
            more = f"; ... {len(self.violations) - 12} more" if len(self.violations) > 12 else ""
            sources = " | ".join(f"{name}: {RULES[name].text}" for name in sorted(self.by_rule()))
            raise AneLintError(f"the package would not run on the Neural Engine: {self.summary()}: {listed}{more}. "
                               f"Rules: {sources}")


def _stack_frames(node: torch.fx.Node) -> tuple[str, str]:
    """(innermost module path, ``file:line`` of the model code) of an fx node."""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [line.strip() for line in trace if line.strip().startswith("File ")]
    line = ""
    if frames:
        m = re.match(r'File "([^"]+)", line (\d+)', frames[-1])
        if m:
            path = m.group(1)
            marker = path.rfind("/models/")
            line = f"{path[marker + 1:] if marker >= 0 else os.path.basename(path)}:{m.group(2)}"
    return module, line


def source_map(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """fx node name -> ``module.path (file:line)`` of the model code that produced it.

    coremltools names MIL ops after the fx nodes (plus a ``_cast_fp16`` suffix), so the
    lint can say which module and line an offending op comes from.
    """
    found: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        module, line = _stack_frames(node)
        text = " ".join(part for part in (module, f"({line})" if line else "") if part)
        if text:
            found[node.name] = text
    return found


def attention_block_map(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """fx node name -> module path of the attention block it runs in (classes ending in ``WindowAttention``)."""
    found: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if str(getattr(cls, "__name__", cls)).endswith(ATTENTION_CLASS_SUFFIX):
                found[node.name] = path
                break
    return found


@dataclass(frozen=True)
class TraceMaps:
    """What one function's trace tells the lint: :func:`source_map` and :func:`attention_block_map`.

    Kept per function: each tile is traced on its own, and the same fx node name can be a
    different op in another tile's trace (chunk counts depend on the tile).
    """

    sources: Mapping[str, str]
    blocks: Mapping[str, str]


def trace_maps(ep: torch.export.ExportedProgram) -> TraceMaps:
    return TraceMaps(source_map(ep), attention_block_map(ep))


def _lookup(op_name: str, mapping: Mapping[str, str]) -> str | None:
    """The entry of the fx node an op is named after (longest ``_``-separated prefix)."""
    name = _DTYPE_SUFFIX.sub("", op_name)
    while name and name not in mapping:
        name = name.rpartition("_")[0]
    return mapping.get(name) if name else None


def function_names(path: str | os.PathLike) -> list[str]:
    """The functions of a package: the multifunction list, else ``["main"]``."""
    return load_program(path).functions


def _input_flexible(program: MILProgram) -> list[str]:
    """Inputs whose sizes are not one fixed shape (declared or in the function's description)."""
    described = list(program.description.input)
    flexible = [f"{f.name} ({kind})" for f in described
                for kind in [f.type.multiArrayType.WhichOneof("ShapeFlexibility") if f.type.WhichOneof("Type") == "multiArrayType"
                             else f.type.imageType.WhichOneof("SizeFlexibility") if f.type.WhichOneof("Type") == "imageType" else None]
                if kind]
    named = {text.split(" ")[0] for text in flexible}
    flexible += [f"{v.name} (unknown sizes {v.shape})" for v in program.inputs
                 if v.name not in named and (v.shape is None or any(d is None for d in v.shape))]
    return flexible


def _nbytes(var) -> int:
    bits = DTYPES.get(var.dtype, (None, 32))[1] or 32
    return int(np.prod(var.shape)) * bits // 8 if var.shape and None not in var.shape else 0


class _Function:
    """What the rules need to know about one function: producers, types, which values are constant."""

    def __init__(self, program: MILProgram) -> None:
        self.program = program
        self.producers = {out.name: op for op in program.ops for out in op.outputs}
        self.types = program.var_types()
        self.inputs = {v.name for v in program.inputs}
        self.outputs = set(program.outputs)

    def is_constant(self, ref) -> bool:
        if ref.name is None:
            return True
        producer = self.producers.get(ref.name)
        return producer is not None and (producer.type == "const" or producer.type in COMPILE_TIME_OPS)

    def shape(self, ref) -> tuple | None:
        if ref.name is None:
            return np.shape(ref.value)
        var = self.types.get(ref.name)
        return None if var is None else var.shape

    def is_io_cast(self, op: MILOp) -> bool:
        return op.type in IO_CAST_OPS and (any(n in self.inputs for n in op.input_names())
                                           or any(o.name in self.outputs for o in op.outputs))


def _check_size_rules(fn: _Function, op: MILOp, add, budget: int) -> tuple[int, str, tuple] | None:
    """``axis`` and ``budget`` for one op; returns its largest counted output (bytes, name, shape)."""
    largest = None
    for out in op.outputs:
        if out.shape and any(d is not None and d > ANE_MAX_AXIS for d in out.shape):
            add("axis", op, f"output {out.shape} has an axis above {ANE_MAX_AXIS}")
        if out.name in fn.outputs or fn.is_io_cast(op):
            continue
        size = _nbytes(out)
        if size > budget:
            add("budget", op, f"output {out.shape} is {format_bytes(size)}, above the {format_bytes(budget)} "
                              f"budget (chunk it, or raise --score-budget)")
        if largest is None or size > largest[0]:
            largest = (size, out.name, out.shape)
    return largest


def _check_conv(fn: _Function, op: MILOp, add) -> None:
    weight = op.inputs.get("weight", [None])[0]
    if weight is None:
        return
    source_op = fn.producers.get(weight.name) if weight.name else None
    if source_op is not None and source_op.type != "const" and source_op.type not in COMPILE_TIME_OPS:
        add("dynamic-conv", op, f"weights computed in the graph (by {source_op.type} '{source_op.name}')")
    shape = fn.shape(weight)
    if shape and len(shape) == 4 and None not in shape[2:]:
        side, text = max(shape[2:]), f"{shape[3]}x{shape[2]}"  # WIDTHxHEIGHT
        if side > ANE_MAX_KERNEL:
            add("kernel", op, f"kernel {text} above {ANE_MAX_KERNEL}")
        elif side > ANE_WARN_KERNEL:
            add("kernel-size", op, f"kernel {text} above {ANE_WARN_KERNEL}")


def _check_broadcast(fn: _Function, op: MILOp, add) -> None:
    refs = [op.inputs.get(k, [None])[0] for k in ("x", "y")]
    if any(r is None or fn.is_constant(r) for r in refs):
        return
    shapes = [fn.shape(r) for r in refs]
    if None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
        add("broadcast", op, f"{shapes[0]} with {shapes[1]}, both computed at run time")


def _check_resample(fn: _Function, op: MILOp, add) -> None:
    x = op.inputs.get("x", [None])[0]
    shape_in = fn.shape(x) if x is not None else None
    shape_out = op.outputs[0].shape if op.outputs else None
    if not shape_in or not shape_out or None in shape_in[-2:] or None in shape_out[-2:]:
        return
    factors = [o / i for i, o in zip(shape_in[-2:], shape_out[-2:])]
    if any(f not in (1.0, 2.0) for f in factors):
        add("upsample", op, f"{op.type} by {factors[1]:g} x {factors[0]:g} (width x height)")


def _check_fp32(fn: _Function, op: MILOp, add) -> None:
    floats32 = [o for o in op.outputs if o.dtype == "FLOAT32"]
    if op.type in IO_CAST_OPS and not floats32:
        x = op.inputs.get("x", [None])[0]
        producer = fn.producers.get(x.name) if x is not None and x.name else None
        if producer is not None and producer.type == "const" and producer.outputs[0].dtype == "FLOAT32":
            add("fp32", op, f"fp32 constant '{producer.name}' cast to fp16 at every prediction "
                            f"(fold it: store the constant in fp16)")
    if floats32 and not fn.is_io_cast(op):
        add("fp32", op, "computes in fp32 (the ANE computes in fp16: export with precision fp16, "
                        "and keep I/O scaling inside the model)")


def lint_program(program: MILProgram, maps: TraceMaps | None = None,
                 budget: int = DEFAULT_BUDGET_BYTES) -> LintReport:
    """Lint one function (a :class:`MILProgram`).

    ``maps``: what this function's trace says (:func:`trace_maps`): the source map names
    the model code of each finding, the attention-block map lets the ``transposes`` rule
    run (without it that rule is not checked). ``budget``: the ``budget`` rule's limit in bytes.
    """
    sources = maps.sources if maps else {}
    blocks = maps.blocks if maps else {}
    name = program.function
    fn = _Function(program)
    found: list[Violation] = []

    def add(rule: str, op, detail: str) -> None:
        found.append(Violation(rule, name, op.name, op.type, detail, _lookup(op.name, sources)))

    for flex in _input_flexible(program):
        found.append(Violation("flexible-shape", name, flex.split(" ")[0], "input",
                               f"input {flex}: the ANE compiles one fixed shape per function", None))
    max_rank = max((v.rank or 0 for v in program.inputs), default=0)
    largest: tuple[int, str, tuple] = (0, "", ())
    per_block: Counter = Counter()
    for op in program.ops:
        if op.type == "const" or op.type in COMPILE_TIME_OPS:
            continue
        rank = max((o.rank or 0 for o in op.outputs), default=0)
        max_rank = max(max_rank, rank)
        if op.type in GATHER_OPS:
            add("gather", op, "gathers and scatters run off the Neural Engine")
        if rank > ANE_MAX_RANK:
            add("rank", op, f"output of rank {rank} (the ANE handles rank <= {ANE_MAX_RANK})")
        biggest = _check_size_rules(fn, op, add, budget)
        if biggest is not None and biggest[0] > largest[0]:
            largest = biggest
        if op.type in CONV_OPS:
            _check_conv(fn, op, add)
        if op.type in ELEMENTWISE_BINARY:
            _check_broadcast(fn, op, add)
        if op.type in RESAMPLE_OPS:
            _check_resample(fn, op, add)
        if op.type == "transpose" and blocks:
            block = _lookup(op.name, blocks)
            if block is not None:
                per_block[block] += 1
        _check_fp32(fn, op, add)
    report = LintReport([name], program.histogram(), max_rank, found, budget, {name: largest},
                        {name: program.histogram().get("transpose", 0)})
    if blocks:
        report.block_transposes[name] = max(per_block.values(), default=0)
        for block, count in sorted(per_block.items()):
            if count > TRANSPOSES_PER_BLOCK:
                found.append(Violation("transposes", name, block, "attention block",
                                       f"{count} transposes (advice: <= {TRANSPOSES_PER_BLOCK})", block))
    return report


def lint_package(path: str | os.PathLike, maps: Mapping[str, TraceMaps] | None = None,
                 budget: int = DEFAULT_BUDGET_BYTES) -> LintReport:
    """Lint every function of a saved package; one report for all of them.

    ``maps``: function name -> its :class:`TraceMaps` (the exporter passes them).
    """
    total = LintReport([], Counter(), 0, budget=budget)
    for name in function_names(path):
        rep = lint_program(load_program(path, function=name), (maps or {}).get(name), budget)
        total.functions += rep.functions
        total.histogram += rep.histogram
        total.max_rank = max(total.max_rank, rep.max_rank)
        total.findings += rep.findings
        total.largest.update(rep.largest)
        total.transposes.update(rep.transposes)
        total.block_transposes.update(rep.block_transposes)
    return total
