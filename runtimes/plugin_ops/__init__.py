"""The ``esc::window_attention`` op in every format, below both exporters and runners.

One place for the fused window-attention op's cross-format contract, so that
``export/`` (which writes it) and ``runtimes/`` (which runs it) import it from below:

* :mod:`.contract`: the ONNX node (domain, name, attributes, schema, IR version) and the
  TensorRT plugin id/namespace; no heavy imports.
* :mod:`.onnxruntime_op`: the ONNX Runtime reference op (onnxruntime-extensions), added
  to every session through a :mod:`runtimes.onnx_runner` session-options hook.
* :mod:`.tensorrt_plugin`: the ``tensorrt.plugin`` registration with the Triton kernel's
  ahead-of-time PTX; TensorRT is imported only when registering.

``session_options_hook`` is this package's entry point for :mod:`runtimes.onnx_runner`.
"""
from .onnxruntime_op import session_options_hook

__all__ = ["session_options_hook"]
