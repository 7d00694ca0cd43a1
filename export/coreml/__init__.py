"""Export ESC models to Core ML ML programs (``.mlpackage``) and check what was written.

- :mod:`.options`: targets, presets, sizes, :class:`CoreMLExportConfig`;
- :mod:`.form`: the model as converted (a copy: ``coreml`` attention, compact kernels);
- :mod:`.convert`: ``torch.export`` and ``ct.convert``;
- :mod:`.compress`: palettisation / int8 of convolution weights;
- :mod:`.checks`: rank, opset and reflect-pad checks on the saved package;
- :mod:`.metadata`: the ``esc.*`` keys and descriptions;
- :mod:`.pipeline`: one export end to end; :mod:`.summary`: its one-screen report.

The command is ``export/to_coreml.py``; parity is :func:`export.verify.verify_artifact`.
"""
from .checks import MAX_RANK, PackageReport, check_package, inspect_package, ops_unavailable_on, reflect_problems
from .compress import KMeansLUT
from .form import ImageOutput, build_model, prepare_model
from .options import (BIAS_MODES, COMPRESSIONS, PRECISIONS, PRESETS, TARGETS, CoreMLExportConfig, CoreMLExportError,
                      PackageCheckError, Preset, default_output_path, parse_shapes, parse_size, resolve_config)
from .pipeline import ExportResult, convert_module, export_coreml
from .summary import summary_rows

__all__ = [
    "BIAS_MODES", "COMPRESSIONS", "MAX_RANK", "PRECISIONS", "PRESETS", "TARGETS", "CoreMLExportConfig",
    "CoreMLExportError", "ExportResult", "ImageOutput", "KMeansLUT", "PackageCheckError", "PackageReport", "Preset",
    "build_model", "check_package", "convert_module", "default_output_path", "export_coreml", "inspect_package",
    "ops_unavailable_on", "parse_shapes", "parse_size", "prepare_model", "reflect_problems", "resolve_config",
    "summary_rows",
]
