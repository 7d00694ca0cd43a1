"""The one-screen summary of a Core ML export: what was written and how to use it."""
from __future__ import annotations

from export.common import human_size

from .checks import MAX_RANK
from .options import INPUT_NAME, OUTPUT_NAME, PRESETS
from .pipeline import ExportResult

__all__ = ["summary_rows"]


def summary_rows(result: ExportResult) -> list[tuple[str, str]]:
    """``(label, text)`` rows for :func:`export.common.print_summary`."""
    cfg, rep, meta = result.config, result.report, result.metadata
    shapes = ", ".join(f"{h}x{w}" for h, w in cfg.declared_shapes)
    io_kind = "RGB image, 0..255 (scaled by 1/255 in the program)" if cfg.image_io else "float32 RGB in [0, 1]"
    out_kind = "RGB image (clamped)" if cfg.image_io else "float32 RGB, unclamped"
    sha = meta.weights_sha256
    weights = f"weights sha256 {sha[:12]}" if sha not in (None, "random") else "random weights"
    return [
        ("artifact", str(result.path)),
        ("size", human_size(rep.size_bytes)),
        ("model", f"{meta.variant or '?'} x{meta.scale or '?'} ({weights})"),
        ("input", f"'{INPUT_NAME}' 1x3x({'enumerated ' if cfg.enumerated else ''}{shapes}) {io_kind}"),
        ("output", f"'{OUTPUT_NAME}' x{cfg.scale} {out_kind}"),
        ("target", f"{cfg.target} (MIL opset {rep.opset}, ML program)"
                   + (f", preset {cfg.preset}: {PRESETS[cfg.preset].device}" if cfg.preset else "")),
        ("precision", cfg.precision + (f", weights {cfg.compress}" if cfg.compress else "")),
        ("attention", result.attention),
        ("ops", f"{sum(rep.histogram.values())}: {rep.histogram_text(12)}"),
        ("checks", f"max rank {rep.max_rank} <= {MAX_RANK}; all {len(rep.histogram)} op types in the "
                   f"{cfg.target} opset; {rep.reflect_pads} reflect pad(s), all legal"),
        ("use (macOS)", f"ct.models.MLModel('{result.path}').predict({{'{INPUT_NAME}': x}})['{OUTPUT_NAME}']"),
        ("use (toolkit)", f"runtimes.load('{result.path}') (Core ML on macOS, numpy interpreter elsewhere)"),
    ]
