"""The Neural Engine lint: what in a saved ML program would keep it off the ANE.

Why our own: coremltools accepts (and Core ML runs) programs that the ANE compiler
quietly hands to the GPU or CPU. The lint reads the saved package (every function of a
multifunction package) and rejects, naming each offending op and, where the exporter
passed its :func:`source_map`, the model code the op came from:

- ``gather``: any gather/scatter family op (index math the ANE does not run);
- ``rank``: a run-time tensor of rank above :data:`ANE_MAX_RANK` (4);
- ``dynamic-conv``: a convolution whose weights are computed in the graph, not constants;
- ``flexible-shape``: an input with enumerated, ranged or unknown sizes;
- ``fp32``: an op computing in fp32 (the ANE computes in fp16), or an fp32 constant
  cast to fp16 at every prediction; only the casts that convert the program's inputs
  and outputs are allowed to touch fp32.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from runtimes.coreml.constexpr import COMPILE_TIME_OPS
from runtimes.coreml.reader import MILProgram, load_program

from .options import PackageCheckError

__all__ = ["ANE_MAX_RANK", "AneLintError", "LintReport", "Violation", "function_names", "lint_package",
           "lint_program", "source_map"]

ANE_MAX_RANK = 4
GATHER_OPS = frozenset({"gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis"})
CONV_OPS = frozenset({"conv", "conv_transpose"})
#: Ops that only move data between the I/O dtype and the compute dtype.
IO_CAST_OPS = frozenset({"cast"})
_DTYPE_SUFFIX = re.compile(r"_cast_fp(16|32)$")


class AneLintError(PackageCheckError):
    """The package is meant for the Neural Engine but has ops that keep it off it."""


@dataclass(frozen=True)
class Violation:
    rule: str
    function: str
    op: str
    op_type: str
    detail: str
    source: str | None

    def __str__(self) -> str:
        where = f" <- {self.source}" if self.source else ""
        return f"[{self.rule}] {self.function}:{self.op_type} '{self.op}': {self.detail}{where}"


@dataclass
class LintReport:
    """Per-function op histograms, ranks and the violations found."""

    functions: list[str]
    histogram: Counter
    max_rank: int
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_rule(self) -> Counter:
        return Counter(v.rule for v in self.violations)

    def summary(self) -> str:
        gathers = sum(self.histogram.get(t, 0) for t in GATHER_OPS)
        head = (f"{sum(self.histogram.values())} ops in {len(self.functions)} function(s), max rank {self.max_rank}, "
                f"{gathers} gather(s)")
        if self.ok:
            return f"passed: {head}, 0 violations"
        rules = ", ".join(f"{rule} x{n}" for rule, n in sorted(self.by_rule().items()))
        return f"FAILED: {len(self.violations)} violation(s) ({rules}); {head}"

    def raise_if_failed(self) -> None:
        if not self.ok:
            listed = "; ".join(str(v) for v in self.violations[:12])
            more = f"; ... {len(self.violations) - 12} more" if len(self.violations) > 12 else ""
            raise AneLintError(f"the package would not run on the Neural Engine: {self.summary()}: {listed}{more}")


def source_map(ep: torch.export.ExportedProgram) -> dict[str, str]:
    """fx node name -> ``module.path (file:line)`` of the model code that produced it.

    coremltools names MIL ops after the fx nodes (plus a ``_cast_fp16`` suffix), so the
    lint can say which module and line an offending op comes from.
    """
    found: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
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
        text = " ".join(part for part in (module, f"({line})" if line else "") if part)
        if text:
            found[node.name] = text
    return found


def _source(op_name: str, sources: Mapping[str, str]) -> str | None:
    """The source of the fx node an op is named after (longest ``_``-separated prefix)."""
    name = _DTYPE_SUFFIX.sub("", op_name)
    while name and name not in sources:
        name = name.rpartition("_")[0]
    return sources.get(name) if name else None


def function_names(path: str | os.PathLike) -> list[str]:
    """The functions of a package: the multifunction list, else ``["main"]``."""
    program = load_program(path)
    listed = [f.name for f in program.spec.description.functions]
    return listed or [program.function]


def _input_flexible(program: MILProgram) -> list[str]:
    """Inputs whose sizes are not one fixed shape (declared or in the function's description)."""
    described = list(program.spec.description.input)
    for func in program.spec.description.functions:
        if func.name == program.function:
            described = list(func.input)
    flexible = [f"{f.name} ({kind})" for f in described
                for kind in [f.type.multiArrayType.WhichOneof("ShapeFlexibility") if f.type.WhichOneof("Type") == "multiArrayType"
                             else f.type.imageType.WhichOneof("SizeFlexibility") if f.type.WhichOneof("Type") == "imageType" else None]
                if kind]
    named = {text.split(" ")[0] for text in flexible}
    flexible += [f"{v.name} (unknown sizes {v.shape})" for v in program.inputs
                 if v.name not in named and (v.shape is None or any(d is None for d in v.shape))]
    return flexible


def lint_program(program: MILProgram, sources: Mapping[str, str] | None = None) -> LintReport:
    """Lint one function (a :class:`MILProgram`)."""
    sources = sources or {}
    fn = program.function
    producers = {out.name: op for op in program.ops for out in op.outputs}
    input_names = {v.name for v in program.inputs}
    outputs = set(program.outputs)
    found: list[Violation] = []

    def add(rule: str, op, detail: str) -> None:
        found.append(Violation(rule, fn, op.name, op.type, detail, _source(op.name, sources)))

    for flex in _input_flexible(program):
        found.append(Violation("flexible-shape", fn, flex.split(" ")[0], "input",
                               f"input {flex}: the ANE compiles one fixed shape per function", None))
    max_rank = max((v.rank or 0 for v in program.inputs), default=0)
    for op in program.ops:
        if op.type == "const" or op.type in COMPILE_TIME_OPS:
            continue
        rank = max((o.rank or 0 for o in op.outputs), default=0)
        max_rank = max(max_rank, rank)
        if op.type in GATHER_OPS:
            add("gather", op, "gathers and scatters run off the Neural Engine")
        if rank > ANE_MAX_RANK:
            add("rank", op, f"output of rank {rank} (the ANE handles rank <= {ANE_MAX_RANK})")
        if op.type in CONV_OPS:
            weight = op.inputs.get("weight", [None])[0]
            source_op = producers.get(weight.name) if weight is not None and weight.name else None
            if source_op is not None and source_op.type != "const" and source_op.type not in COMPILE_TIME_OPS:
                add("dynamic-conv", op, f"weights computed in the graph (by {source_op.type} '{source_op.name}')")
        floats32 = [o for o in op.outputs if o.dtype == "FLOAT32"]
        if op.type in IO_CAST_OPS and not floats32:
            x = op.inputs.get("x", [None])[0]
            producer = producers.get(x.name) if x is not None and x.name else None
            if producer is not None and producer.type == "const" and producer.outputs[0].dtype == "FLOAT32":
                add("fp32", op, f"fp32 constant '{producer.name}' cast to fp16 at every prediction "
                                f"(fold it: store the constant in fp16)")
        if floats32:
            io_cast = op.type in IO_CAST_OPS and (
                any(name in input_names for name in op.input_names())
                or any(o.name in outputs for o in op.outputs))
            if not io_cast:
                add("fp32", op, "computes in fp32 (the ANE computes in fp16: export with precision fp16, "
                                "and keep I/O scaling inside the model)")
    return LintReport([fn], program.histogram(), max_rank, found)


def lint_package(path: str | os.PathLike, sources: Mapping[str, str] | None = None) -> LintReport:
    """Lint every function of a saved package; one report for all of them."""
    total = LintReport([], Counter(), 0)
    for name in function_names(path):
        rep = lint_program(load_program(path, function=name), sources)
        total.functions += rep.functions
        total.histogram += rep.histogram
        total.max_rank = max(total.max_rank, rep.max_rank)
        total.violations += rep.violations
    return total
