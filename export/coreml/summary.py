"""The one-screen summary of a Core ML export: what was written and how to use it."""
from __future__ import annotations

from export.common import human_size
from models.ane.budget import format_bytes
from runtimes.cli_args import format_size

from .checks import MAX_RANK
from .options import INPUT_NAME, OUTPUT_NAME, PRESETS
from .pipeline import ExportResult

__all__ = ["summary_rows"]


def _io_text(result: ExportResult) -> tuple[str, str]:
    cfg = result.config
    if cfg.image_io:
        return "RGB image, 0..255 (scaled by 1/255 inside the program)", "RGB image (clamped)"
    dtype = "float16" if cfg.io_dtype == "fp16" else "float32"
    return f"{dtype} RGB in [0, 1]", f"{dtype} RGB, unclamped"


def summary_rows(result: ExportResult) -> list[tuple[str, str]]:
    """``(label, text)`` rows for :func:`export.common.print_summary`."""
    cfg, rep, meta = result.config, result.report, result.metadata
    shapes = ", ".join(format_size(h, w) for h, w in cfg.declared_shapes)
    in_kind, out_kind = _io_text(result)
    sha = meta.weights_sha256
    weights = f"weights sha256 {sha[:12]}" if sha not in (None, "random") else "random weights"
    if cfg.multifunction:
        layout = "functions " + ", ".join(f"{name} ({format_size(h, w)})" for name, (h, w) in rep.functions.items())
    else:
        layout = f"'{INPUT_NAME}' 1x3x({'enumerated ' if cfg.enumerated else ''}{shapes}) {in_kind}"
    rows = [
        ("artifact", str(result.path)),
        ("size", human_size(rep.size_bytes)),
        ("model", f"{meta.variant or '?'} x{meta.scale or '?'} ({weights}), {cfg.form} form"),
        ("input", layout if not cfg.multifunction else f"{layout}; '{INPUT_NAME}': {in_kind}"),
        ("output", f"'{OUTPUT_NAME}' x{cfg.scale} {out_kind}"),
        ("target", f"{cfg.target} (MIL opset {rep.opset}, ML program)"
                   + (f", preset {cfg.preset}: {PRESETS[cfg.preset].device}" if cfg.preset else "")),
        ("precision", cfg.precision + (f", weights {cfg.compress}" if cfg.compress else "")),
        ("attention", result.attention),
        ("ops", f"{sum(rep.histogram.values())}: {rep.histogram_text(12)}"),
        ("contract", f"every requested tile served, outputs x{cfg.scale}"),
        ("safety nets", f"max rank {rep.max_rank} <= {MAX_RANK}; all {len(rep.histogram)} op types in the "
                        f"{cfg.target} opset; {rep.reflect_pads} reflect pad(s), all legal "
                        f"(coremltools guarantees these; re-checked on the saved file)"),
        ("ANE lint", result.lint.summary() if result.lint else
         f"not run: not a Neural Engine target ({cfg.form} form, {cfg.precision})"),
    ]
    if cfg.form == "ane":
        rewrites = [name for name, on in (("13x13 as 7x7 pieces", cfg.large_kernel_pieces),
                                          ("global mean as constant-weight convs", cfg.mean_as_conv)) if on]
        rows.append(("ANE form", f"tensor budget {format_bytes(cfg.score_budget)}; contingencies: "
                                 f"{', '.join(rewrites) if rewrites else 'off'}"))
    if result.fp16_safety is not None:
        rows.append(("fp16 safety", result.fp16_safety.summary()))
    elif cfg.precision == "fp16":
        rows.append(("fp16 safety", "not run: a module converted directly (convert_module), not an ESC export"))
    first = next(iter(rep.functions), "main")
    function = f", function_name='{first}'" if cfg.multifunction else ""
    chosen = f", function='{first}'" if cfg.multifunction else ""
    rows += [
        ("use (macOS)", f"ct.models.MLModel('{result.path}'{function}).predict({{'{INPUT_NAME}': x}})['{OUTPUT_NAME}']"),
        ("use (toolkit)", f"runtimes.load('{result.path}'{chosen}) (Core ML on macOS, numpy interpreter elsewhere)"),
    ]
    return rows
