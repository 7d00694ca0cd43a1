"""Exporters that turn an ESC PyTorch model into a deployable artifact.

- :mod:`export.common`: what every exporter shares (atomic writes, hashing, the
  one-screen summary, the ``--model/--scale/--weights/-o`` arguments, the CLI wrapper
  that turns user errors into ``error: ...`` and exit status 2).
- :mod:`export.onnx_export` (library) and ``export/to_onnx.py`` (command): ONNX through
  ``torch.onnx.export(dynamo=True)``, opset 18 (decomposed attention) or 23 (native
  ``Attention``), fp32 or fp16, dynamic or fixed shapes, simplified with onnxslim under
  a parity check, with ``esc.*`` metadata that the runners read.
- :mod:`export.coreml_export` / ``export/to_coreml.py``: Core ML packages.

Every exporter writes its artifact atomically (a half-written file never takes the
final name) and ends with a summary that says how to use what it wrote.
"""
