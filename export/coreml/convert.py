"""From a PyTorch module to an (unsaved) ML program: ``torch.export``, then ``ct.convert``.

Conversion path (coremltools 9 with torch 2.13; ``torch.jit.trace`` input fails inside
the converter there)::

    torch.export.export(module, (x,)).run_decompositions({})  ->  ct.convert(..., mlprogram)

* **Fixed vs enumerated shapes.** A fixed-shape export traces one input size (any size:
  the model reflect-pads to the window internally). Enumerated shapes need a
  shape-generic graph: height and width are exported as symbolic multiples of the
  attention window (the window padding would otherwise be traced as a constant).
* **Constant folding.** For the compat form coremltools is told not to fold tensors above
  :data:`CONST_FOLD_LIMIT` elements: otherwise it folds the attention bias gather into a
  16 MB constant per block (ESC: +80 MB fp32). The ANE form has no gather to fold and
  wants its dense bias constants folded to fp16 (else each would stay an fp32 constant
  cast at every prediction), so it keeps coremltools' default.
* **Image I/O.** ``ct.ImageType`` input and output (Core ML feeds and takes 0..255 pixels);
  the 1/255 scaling is inside the module (:class:`export.coreml.form.ImageIO`), so it runs
  in fp16 in fp16 programs. Tensor I/O is float32 or, with ``io_dtype="fp16"``, float16.
* **torch 2.13 / coremltools 9 mismatches** (:func:`patch_graph_for_coremltools`), and
  per-pass whole-program re-validation skipped (:func:`validate_once_per_pass_group`).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from runtimes.coreml.tools import import_coremltools

from .compress import add_compression_passes
from .options import INPUT_NAME, OUTPUT_NAME, CoreMLExportConfig, CoreMLExportError

__all__ = ["CONST_FOLD_LIMIT", "convert_program", "coremltools", "export_program", "patch_graph_for_coremltools"]

#: Constants above this many elements are not folded by coremltools (see module doc).
CONST_FOLD_LIMIT = 100_000


def coremltools() -> Any:
    """coremltools, imported quietly; its absence is a :class:`CoreMLExportError`."""
    return import_coremltools(CoreMLExportError, "Core ML export")


def export_program(module: nn.Module, example: torch.Tensor, dynamic_multiple: int | None = None,
                   max_size: tuple[int, int] | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` + ``run_decompositions({})``, cleaned for coremltools.

    ``dynamic_multiple``: export height and width as symbolic multiples of it (up to
    ``max_size``), for enumerated shapes.
    """
    dynamic_shapes = None
    if dynamic_multiple is not None:
        mh = max(1, math.ceil((max_size or example.shape[-2:])[0] / dynamic_multiple))
        mw = max(1, math.ceil((max_size or example.shape[-2:])[1] / dynamic_multiple))
        kh = torch.export.Dim("tiles_h", min=1, max=max(mh, 2))
        kw = torch.export.Dim("tiles_w", min=1, max=max(mw, 2))
        dynamic_shapes = ({2: dynamic_multiple * kh, 3: dynamic_multiple * kw},)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
            ep = ep.run_decompositions({})
    except Exception as exc:
        raise CoreMLExportError(
            f"torch.export could not trace {type(module).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from exc
    if patch_graph_for_coremltools(ep.graph):
        ep.graph_module.recompile()
    return ep


def patch_graph_for_coremltools(graph: torch.fx.Graph) -> int:
    """Rewrite the nodes coremltools 9 mis-converts from torch 2.13 exports; returns how many.

    * ``aten.alias`` (a no-op view left by ``run_decompositions``; coremltools does not
      know it): removed;
    * ``aten.zeros`` / ``aten.ones`` with a ``dtype`` keyword: coremltools reads the dtype
      only from a positional argument and makes float32 tensors, so integer index math
      built on them (the model's reflect-padding indices) turns float and the ``gather``
      using it is refused. Rewritten as ``aten.full(size, 0 | 1, dtype=...)``, whose dtype
      keyword it honours.
    """
    changed = 0
    fills = {torch.ops.aten.zeros.default: 0, torch.ops.aten.ones.default: 1}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            changed += 1
        elif node.target in fills and node.kwargs.get("dtype") is not None:
            node.args = (node.args[0], fills[node.target])
            node.target = torch.ops.aten.full.default
            changed += 1
    return changed


def _pass_pipeline(ct: Any, cfg: CoreMLExportConfig) -> Any:
    pipeline = ct.PassPipeline.DEFAULT
    if cfg.form != "ane":
        pipeline.set_options("common::const_elimination", {"skip_const_by_size": str(CONST_FOLD_LIMIT)})
    if cfg.compress:
        add_compression_passes(pipeline, cfg.compress, cfg.opset)
    return pipeline


@contextlib.contextmanager
def validate_once_per_pass_group() -> Iterator[None]:
    """Skip coremltools' whole-program re-validation after every one of its ~110 passes.

    ``Program.validate`` walks every op after each pass; for ESC's ~10k ops that is about
    half of the conversion time. Validations that also check scopes (after the frontend,
    after each dead-code elimination, and in the backend before serialisation) still run,
    so an invalid program is still refused before it is written.
    """
    from coremltools.converters.mil.mil.program import Program

    original = Program.validate

    def validate(self: Any, check_essential_scope: bool = False) -> None:
        if check_essential_scope:
            original(self, check_essential_scope=check_essential_scope)

    Program.validate = validate  # type: ignore[method-assign]
    try:
        yield
    finally:
        Program.validate = original  # type: ignore[method-assign]


def convert_program(ep: torch.export.ExportedProgram, cfg: CoreMLExportConfig,
                    size: tuple[int, int] | None = None) -> Any:
    """``ct.convert`` an exported program into an (unsaved) ML program model.

    ``size``: the one fixed (H, W) of this program (a tile of a multifunction package);
    default: the config's declared shape(s).
    """
    ct = coremltools()
    shapes = [(1, 3, h, w) for h, w in ([size] if size else cfg.declared_shapes)]
    shape: Any = shapes[0]
    if cfg.enumerated and size is None:
        shape = ct.EnumeratedShapes(shapes=shapes, default=shapes[0])
    if cfg.image_io:
        inputs = [ct.ImageType(name=INPUT_NAME, shape=shape, color_layout=ct.colorlayout.RGB)]
        outputs = [ct.ImageType(name=OUTPUT_NAME, color_layout=ct.colorlayout.RGB)]
    else:
        io_dtype = np.float16 if cfg.io_dtype == "fp16" else np.float32
        inputs = [ct.TensorType(name=INPUT_NAME, shape=shape, dtype=io_dtype)]
        outputs = [ct.TensorType(name=OUTPUT_NAME, dtype=io_dtype)]
    target = getattr(ct.target, cfg.target)
    precision = ct.precision.FLOAT16 if cfg.precision == "fp16" else ct.precision.FLOAT32
    try:
        with validate_once_per_pass_group(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ct.convert(ep, inputs=inputs, outputs=outputs, convert_to="mlprogram",
                              minimum_deployment_target=target, compute_precision=precision,
                              pass_pipeline=_pass_pipeline(ct, cfg), skip_model_load=True)
    except CoreMLExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ""
        raise CoreMLExportError(f"coremltools could not convert the model for {cfg.target} "
                                f"({type(exc).__name__}: {first})") from exc
