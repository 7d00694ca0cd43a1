"""Checks on a saved package, read back the way Core ML reads it (:mod:`runtimes.coreml`).

Why after saving: what ships is the file, not coremltools' in-memory program. Two kinds:

* **our contract** (what the exporter promises and coremltools does not know about):
  every requested input shape is served by a function of exactly that shape (or is one
  of the enumerated shapes), and every output is ``scale`` times the input;
* **safety nets** (re-checks of what coremltools already guarantees when it converts for
  the same target; they catch a broken converter or a hand-edited package, and are
  labelled as such in the summary): tensor rank <= :data:`MAX_RANK`, every op in the
  target's opset, the opset not newer than the target, reflect pads legal (pad < size).

The Neural Engine contract is :mod:`.lint`. A failing package never takes its final name.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.common import path_size
from runtimes.cli_args import format_size
from runtimes.coreml.interpreter import Interpreter
from runtimes.coreml.constexpr import COMPILE_TIME_OPS
from runtimes.coreml.reader import MILOp, MILProgram, load_program

from .convert import coremltools
from .lint import function_names
from .options import TARGETS, PackageCheckError

__all__ = ["MAX_RANK", "PackageReport", "check_package", "inspect_package", "ops_unavailable_on"]

MAX_RANK = 5
#: MIL opsets in release order (a program may not be newer than its target).
OPSET_ORDER = ("iOS15", "iOS16", "iOS17", "iOS18", "iOS26")


@dataclass
class PackageReport:
    """What :func:`inspect_package` found in a saved package."""

    path: Path
    size_bytes: int
    opset: str
    target: str
    histogram: Counter
    max_rank: int
    max_rank_vars: list[str]
    unavailable_ops: list[str]
    reflect_pads: int
    reflect_pad_problems: list[str]
    opset_problem: str | None
    inputs: list[str]
    outputs: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    functions: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> fixed (H, W) input
    contract_problems: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = list(self.contract_problems)
        if self.max_rank > MAX_RANK:
            found.append(f"tensors of rank {self.max_rank} (Core ML allows at most {MAX_RANK}): "
                         f"{', '.join(self.max_rank_vars[:5])}")
        if self.unavailable_ops:
            found.append(f"ops not available on {self.target}: {', '.join(self.unavailable_ops)}")
        found += self.reflect_pad_problems
        if self.opset_problem:
            found.append(self.opset_problem)
        return found

    @property
    def ok(self) -> bool:
        return not self.problems

    def histogram_text(self, limit: int | None = None) -> str:
        items = self.histogram.most_common(limit)
        return ", ".join(f"{name} {count}" for name, count in items)


def ops_unavailable_on(op_types: Sequence[str], target: str) -> list[str]:
    """Op types that the MIL opset of ``target`` (an iOS/macOS name) does not define."""
    ct = coremltools()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    value = getattr(ct.target, TARGETS.get(target, target)).value
    registry = SSAOpRegistry.core_ops
    return sorted(t for t in set(op_types) if t not in registry or value not in registry[t])


def _max_rank(program: MILProgram) -> tuple[int, list[str]]:
    """The largest run-time tensor rank and the values that have it (compile-time payloads
    such as LUTs and packed indices are not run-time tensors)."""
    consumers = program.consumers()
    max_rank, max_vars = 0, []
    vars_to_check = list(program.inputs)
    for op in program.ops:
        users = consumers.get(op.outputs[0].name)
        if op.type == "const" and users and all(u.type in COMPILE_TIME_OPS for u in users):
            continue
        vars_to_check += op.outputs
    for var in vars_to_check:
        rank = var.rank or 0
        if rank > max_rank:
            max_rank, max_vars = rank, [var.name]
        elif rank == max_rank:
            max_vars.append(var.name)
    return max_rank, max_vars


def _opset_problem(program: MILProgram, target: str) -> str | None:
    wanted = TARGETS.get(target, target)
    if program.target in OPSET_ORDER and wanted in OPSET_ORDER \
            and OPSET_ORDER.index(program.target) > OPSET_ORDER.index(wanted):
        return (f"the program's opset {program.opset} ({program.target}) is newer than the {target} "
                f"opset ({wanted}): {target} devices cannot load it")
    return None


def _served_shapes(program: MILProgram) -> list[tuple[int, int]]:
    """(H, W) sizes one function accepts: its fixed input shape, else its enumerated list."""
    shape = program.inputs[0].shape if program.inputs else None
    if shape is not None and len(shape) == 4 and None not in shape:
        return [(int(shape[2]), int(shape[3]))]
    return program.input_shapes()


def _contract_problems(programs: dict[str, MILProgram], shapes: Sequence[tuple[int, int]] | None,
                       scale: int | None) -> list[str]:
    """Requested shapes without a function serving them; outputs not ``scale`` times the input."""
    found: list[str] = []
    served = {size: name for name, program in programs.items() for size in _served_shapes(program)}
    for h, w in shapes or []:
        if (h, w) not in served:
            found.append(f"no function serves the requested {w}x{h} input (the package serves "
                         f"{', '.join(f'{sw}x{sh}' for sh, sw in served) or 'no fixed shape'})")
    for name, program in programs.items():
        out = program.var_types().get(program.outputs[0]) if program.outputs else None
        fixed = _served_shapes(program)
        if scale and out is not None and out.shape and None not in out.shape and len(fixed) == 1:
            h, w = fixed[0]
            if tuple(out.shape[-2:]) != (scale * h, scale * w):
                found.append(f"function {name}: output {tuple(out.shape)} is not x{scale} of the {w}x{h} input")
    return found


def inspect_package(path: str | os.PathLike, target: str | None = None,
                    shapes: Sequence[tuple[int, int]] | None = None, scale: int | None = None) -> PackageReport:
    """Read a saved package back (every function of it) and measure what the checks need.

    ``target``: the deployment target to check op availability against (default: the
    program's own opset). ``shapes``: the (H, W) input shapes asked for: each must be
    served, and symbolic reflect pads are evaluated at them (default: the declared ones).
    ``scale``: the upscaling factor every output must have (default: not checked).
    """
    programs = {name: load_program(path, function=name) for name in function_names(path)}
    first = next(iter(programs.values()))
    target = target or first.target
    histogram: Counter = Counter()
    max_rank, max_vars, unavailable, pads, problems = 0, [], set(), 0, []
    for program in programs.values():
        histogram += program.histogram()
        rank, rank_vars = _max_rank(program)
        if rank > max_rank:
            max_rank, max_vars = rank, rank_vars
        unavailable.update(ops_unavailable_on([op.type for op in program.ops], target))
        found, count = _reflect_pad_problems(program, shapes if len(programs) == 1 else None)
        pads += count
        problems += found
    return PackageReport(
        path=Path(path), size_bytes=path_size(path), opset=first.opset, target=target,
        histogram=histogram, max_rank=max_rank, max_rank_vars=max_vars, unavailable_ops=sorted(unavailable),
        reflect_pads=pads, reflect_pad_problems=problems, opset_problem=_opset_problem(first, target),
        inputs=[v.name for v in first.inputs], outputs=list(first.outputs), metadata=first.metadata,
        functions={name: _served_shapes(p)[0] for name, p in programs.items() if len(_served_shapes(p)) == 1},
        contract_problems=_contract_problems(programs, shapes, scale))


def _reflect_pad_problems(program: MILProgram, shapes: Sequence[tuple[int, int]] | None) -> tuple[list[str], int]:
    """Illegal reflect pads of one function (pad >= size), and how many reflect pads it has."""
    pads = [op for op in program.ops if op.type == "pad" and _pad_mode(program, op) == "reflect"]
    problems: list[str] = []
    var_types = program.var_types()
    symbolic = []
    for op in pads:
        amounts = _pad_amounts(program, op)
        x_type = var_types.get(op.inputs["x"][0].name) if op.inputs["x"][0].name else None
        if amounts is None or x_type is None or x_type.shape is None or None in x_type.shape:
            symbolic.append(op)
            continue
        problems += reflect_problems(op.name, x_type.shape, amounts, None)
    if symbolic:
        problems += _reflect_problems_by_running(program, symbolic, shapes or program.input_shapes())
    return problems, len(pads)


def _const_value(program: MILProgram, op: MILOp, key: str) -> Any:
    refs = op.inputs.get(key)
    if not refs:
        return None
    ref = refs[0]
    if ref.name is None:
        return ref.value
    for producer in program.ops:
        if producer.type == "const" and producer.outputs[0].name == ref.name:
            return producer.attributes.get("val")
    return None


def _pad_mode(program: MILProgram, op: MILOp) -> str:
    mode = _const_value(program, op, "mode")
    if mode is None:
        return "constant"
    return str(np.asarray(mode).reshape(-1)[0]) if isinstance(mode, np.ndarray) else str(mode)


def _pad_amounts(program: MILProgram, op: MILOp) -> list[int] | None:
    pad = _const_value(program, op, "pad")
    return None if pad is None else [int(v) for v in np.asarray(pad).reshape(-1)]


def reflect_problems(name: str, shape: Sequence[int], amounts: Sequence[int], where: str | None) -> list[str]:
    """Why a reflect pad of ``amounts`` on a tensor of ``shape`` is illegal (pad >= size); [] when legal."""
    n = len(amounts) // 2
    found = []
    for i in range(n):
        axis = len(shape) - n + i
        before, after = amounts[2 * i], amounts[2 * i + 1]
        if (before or after) and max(before, after) >= shape[axis]:
            at = f" for input {where}" if where else ""
            found.append(f"reflect pad '{name}'{at} pads {max(before, after)} on an axis of size {shape[axis]} "
                         f"(Core ML needs pad < size)")
    return found


def _reflect_problems_by_running(program: MILProgram, pads: list[MILOp],
                                 shapes: Sequence[tuple[int, int]]) -> list[str]:
    """Evaluate symbolic reflect pads by running the program at each declared shape."""
    if not shapes:
        return [f"reflect pad '{op.name}' has symbolic sizes and no declared shapes were given to check it"
                for op in pads]
    watched = {op.name for op in pads}
    problems: list[str] = []
    interp = Interpreter(program, precision="fp32")
    for h, w in shapes:
        def trace(op: MILOp, outputs: list[Any], env: dict[str, Any], h: int = h, w: int = w) -> None:
            if op.name in watched:
                x_ref, pad_ref = op.inputs["x"][0], op.inputs["pad"][0]
                x = env[x_ref.name] if x_ref.name else x_ref.value
                pad = env[pad_ref.name] if pad_ref.name else pad_ref.value
                amounts = [int(v) for v in np.asarray(pad).reshape(-1)]
                problems.extend(reflect_problems(op.name, np.asarray(x).shape, amounts, format_size(h, w)))
        try:
            interp.run({program.inputs[0].name: np.zeros((1, 3, h, w), np.float32)}, trace=trace)
        except Exception as exc:  # the interpreter's own reflect check raises too
            problems.append(f"running the program at {format_size(h, w)} to check its reflect pads failed: {exc}")
    return problems


def check_package(report: PackageReport) -> None:
    """Raise :class:`PackageCheckError` listing every failed check."""
    if not report.ok:
        raise PackageCheckError(
            f"the converted package fails {len(report.problems)} check(s): " + "; ".join(report.problems))
