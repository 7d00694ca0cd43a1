"""Export ESC models to Core ML ML programs (``.mlpackage``) and check what was written.

- :mod:`.options`: targets, presets, sizes, :class:`CoreMLExportConfig`;
- :mod:`.form`: the model as converted (a copy): the ANE form (``models.ane``) or the
  compat form (``coreml`` attention, compact kernels);
- :mod:`.convert`: ``torch.export`` and ``ct.convert``;
- :mod:`.compress`: palettisation / int8 of convolution weights;
- :mod:`.checks`: our contract (every tile served, outputs x scale) and safety nets
  (rank, opset, reflect pads) on the saved package;
- :mod:`.lint`: the Neural Engine lint (refusals: gathers, rank > 4, computed conv
  weights, flexible shapes, fp32 compute, tensors above the budget, axes above 16384,
  kernels above 13; advice: kernels above 7, run-time broadcasts, resampling other than
  x2, transposes per attention block), run for ANE targets;
- :mod:`.safety`: fp16 safety of fp16 exports (ranges on pictures, :mod:`export.calibration`);
- :mod:`.parity`: every function of a package against PyTorch through the interpreter;
- :mod:`.metadata`: the ``esc.*`` keys and descriptions;
- :mod:`.pipeline`: one export end to end; :mod:`.summary`: its one-screen report.

The command is ``export/to_coreml.py``.
"""
from .checks import MAX_RANK, PackageReport, check_package, inspect_package, ops_unavailable_on, reflect_problems
from .compress import KMeansLUT
from .form import ImageIO, build_model, prepare_model
from .lint import ANE_MAX_RANK, RULES, AneLintError, LintReport, Rule, Violation, lint_package, lint_program
from .options import (BIAS_MODES, COMPRESSIONS, FORMS, IO_DTYPES, PRECISIONS, PRESETS, TARGETS, CoreMLExportConfig,
                      CoreMLExportError, PackageCheckError, PackageParityError, Preset, default_output_path, parse_budget,
                      parse_shapes, parse_size, parse_tiles, resolve_config)
from .parity import function_parity, package_parity
from .pipeline import ExportResult, convert_module, export_coreml
from .summary import summary_rows

__all__ = [
    "ANE_MAX_RANK", "RULES", "Rule", "parse_budget", "BIAS_MODES", "COMPRESSIONS", "FORMS", "IO_DTYPES", "MAX_RANK", "PRECISIONS", "PRESETS",
    "TARGETS", "AneLintError", "CoreMLExportConfig", "CoreMLExportError", "ExportResult", "ImageIO", "KMeansLUT",
    "LintReport", "PackageCheckError", "PackageParityError", "PackageReport", "Preset", "Violation", "build_model", "check_package",
    "convert_module", "default_output_path", "export_coreml", "function_parity", "inspect_package", "lint_package",
    "lint_program", "ops_unavailable_on", "package_parity", "parse_shapes", "parse_size", "parse_tiles",
    "prepare_model", "reflect_problems", "resolve_config", "summary_rows",
]
