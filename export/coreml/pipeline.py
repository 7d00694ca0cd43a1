"""One export, end to end: trace, convert, describe, save atomically, check what was saved.

A failing package never takes its final name: it is saved into a temporary directory,
read back and checked (:mod:`.checks`; for Neural Engine targets also the ANE lint,
:mod:`.lint`), and renamed into place only after the checks pass. Several tiles become
one static function each in a multifunction package (coremltools'
``MultiFunctionDescriptor`` / ``save_multifunction``; weights shared by the functions
are stored once). Parity with PyTorch is :mod:`.parity` on the written package (the
numpy interpreter on Linux, every function), run by the command's ``--verify``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from export.common import atomic_output
from runtimes.cli_args import format_size
from runtimes.metadata import ArtifactMetadata

from .checks import PackageReport, check_package, inspect_package
from .convert import convert_program, coremltools, export_program
from .form import build_model, export_copy
from .lint import LintReport, TraceMaps, lint_package, trace_maps
from .metadata import apply_metadata, artifact_metadata, copy_package_metadata, function_name
from .options import CoreMLExportConfig, CoreMLExportError, default_output_path
from .safety import Fp16Safety

__all__ = ["ExportResult", "convert_module", "export_coreml"]


@dataclass
class ExportResult:
    """What one export wrote and found (:func:`export.coreml.summary.summary_rows` prints it)."""

    path: Path
    config: CoreMLExportConfig
    report: PackageReport
    metadata: ArtifactMetadata
    attention: str
    model: nn.Module | None = field(default=None, repr=False)  # the PyTorch model that was converted
    lint: LintReport | None = None  # the ANE lint, for Neural Engine targets
    fp16_safety: Fp16Safety | None = None  # fp16 exports of ESC models (export_coreml)


def _attention_form(report: PackageReport) -> str:
    if report.histogram.get("scaled_dot_product_attention"):
        return f"fused scaled_dot_product_attention x{report.histogram['scaled_dot_product_attention']}"
    return f"decomposed: matmul x{report.histogram.get('matmul', 0)} + softmax x{report.histogram.get('softmax', 0)}"


def _trace_example(module: nn.Module, cfg: CoreMLExportConfig, model: nn.Module | None,
                   size: tuple[int, int] | None = None) -> tuple[torch.Tensor, int | None]:
    """The example input to trace and, for enumerated shapes, the window its sizes are multiples of."""
    shapes = cfg.declared_shapes
    seed = torch.Generator().manual_seed(0)
    if not cfg.enumerated or size is not None:
        return torch.rand(1, 3, *(size or shapes[0]), generator=seed), None
    window = getattr(getattr(model or module, "config", None), "window_size", None) or 32
    bad = [format_size(h, w) for h, w in shapes if h % window or w % window]
    if bad:
        raise CoreMLExportError(
            f"enumerated shapes must be multiples of the attention window ({window}): {', '.join(bad)}. "
            f"The window padding is traced into the graph, so one program serves only window multiples; "
            f"export a fixed --input-size for other sizes.")
    # Trace at two windows per side: torch.export specialises symbolic sizes that are 1,
    # so an example of one window would pin the graph to that size.
    return torch.rand(1, 3, 2 * window, 2 * window, generator=seed), window


def _convert_one(traced: nn.Module, cfg: CoreMLExportConfig, model: nn.Module | None, meta: ArtifactMetadata,
                 size: tuple[int, int] | None, maps: dict[str, TraceMaps], function: str = "main") -> Any:
    """Trace and convert ``traced`` at one fixed ``size`` (None: the config's shape(s)), metadata applied.

    ``maps[function]`` is set to what this trace tells the lint.
    """
    example, window = _trace_example(traced, cfg, model, size)
    shapes = [size] if size else cfg.declared_shapes
    ep = export_program(traced, example, dynamic_multiple=window,
                        max_size=(max(h for h, _ in shapes), max(w for _, w in shapes)))
    maps[function] = trace_maps(ep)
    ml = convert_program(ep, cfg, size)
    apply_metadata(ml, cfg, meta)
    return ml


def _save(ml: Any, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ml.save(str(path))
    # coremltools writes ExecuTorch's op-to-source mapping (~1 MB for ESC) beside the
    # package data for torch.export sources; Core ML never reads it (it is not in the
    # package manifest), so it is dropped.
    debug_map = path / "executorch_debug_handle_mapping.json"
    if debug_map.is_file():
        debug_map.unlink()


def _save_multifunction(traced: nn.Module, cfg: CoreMLExportConfig, model: nn.Module | None,
                        meta: ArtifactMetadata, out: Path, maps: dict[str, TraceMaps]) -> None:
    """One static function ``tile_<W>x<H>`` per tile, the first one the default."""
    ct = coremltools()
    with tempfile.TemporaryDirectory(prefix="coreml_tiles_") as scratch:
        desc = ct.utils.MultiFunctionDescriptor()
        first = None
        for h, w in cfg.declared_shapes:
            part = Path(scratch) / f"{function_name(h, w)}.mlpackage"
            _save(_convert_one(traced, cfg, model, meta, (h, w), maps, function_name(h, w)), part)
            desc.add_function(str(part), src_function_name="main", target_function_name=function_name(h, w))
            first = first or part
        desc.default_function_name = function_name(*cfg.declared_shapes[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ct.utils.save_multifunction(desc, str(out))
        copy_package_metadata(first, out)


def convert_module(module: nn.Module, cfg: CoreMLExportConfig, output: str | os.PathLike | None = None,
                   model_for_metadata: nn.Module | None = None, weights_sha256: str | None = None,
                   check: bool = True) -> ExportResult:
    """Convert any ``(1,3,h,w) -> (1,3,sh,sw)`` module with the export code path and save it.

    This is what :func:`export_coreml` uses after building the model; tests feed it wrapped
    or deliberately broken modules. ``module`` itself is not changed (a copy is traced,
    :func:`export.coreml.form.export_copy`). With ``check=True`` a package failing
    :func:`export.coreml.checks.inspect_package` (or, for Neural Engine targets, the ANE
    lint) raises :class:`PackageCheckError` and nothing is written.
    """
    cfg.validate()
    if cfg.scale is None:
        cfg.scale = getattr(model_for_metadata if model_for_metadata is not None else module, "scale", None)
        if cfg.scale is None:
            raise CoreMLExportError("the upscaling factor is unknown: set CoreMLExportConfig.scale")
    out = Path(output or cfg.output or default_output_path(cfg))
    if out.suffix != ".mlpackage":
        raise CoreMLExportError(f"the output must end in .mlpackage (ML programs are packages), got {out}")
    traced = export_copy(module, cfg.image_io)
    meta = artifact_metadata(cfg, model_for_metadata, weights_sha256)
    maps: dict[str, TraceMaps] = {}
    with atomic_output(out) as tmp:
        if cfg.multifunction:
            _save_multifunction(traced, cfg, model_for_metadata, meta, Path(tmp), maps)
        else:
            _save(_convert_one(traced, cfg, model_for_metadata, meta, None, maps), Path(tmp))
        report = inspect_package(tmp, cfg.target, cfg.declared_shapes, cfg.scale)
        lint = lint_package(tmp, maps, cfg.score_budget) if cfg.ane_target else None
        if check:
            check_package(report)
            if lint is not None:
                lint.raise_if_failed()
    report.path = out
    return ExportResult(out, cfg, report, meta, _attention_form(report), model_for_metadata, lint)


def export_coreml(cfg: CoreMLExportConfig) -> ExportResult:
    """Build the ESC model of ``cfg`` (fp16 exports: made fp16-safe first), convert, check and save it."""
    cfg.validate()
    model, sha, safety = build_model(cfg)
    result = convert_module(model, cfg, cfg.output, model_for_metadata=model, weights_sha256=sha)
    result.fp16_safety = safety
    return result
