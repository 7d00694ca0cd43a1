"""The Apple Neural Engine form of an ESC model (a model option, like ``set_attention``).

Why a separate form: the form exporters use elsewhere is shaped for ONNX/TensorRT and
for any input size; read as the Neural Engine's compiler reads it, it gathers the
relative-position bias at every call, emits reflect-padding index math even for
window-multiple inputs and goes through rank-5 tensors. The ANE form computes the same
function (fp32 parity is tested) with:

- window attention in rank-4 tensors, one head at a time, queries optionally chunked
  (:mod:`.attention`);
- the dense relative-position bias stored as one constant per head (and query chunk),
  laid out as the ``(queries, keys)`` addend of the score matmul: no gather;
- padding only when a side is not a window multiple, as a ``pad`` op where that is legal;
- the dynamic 3x3 convolution as fixed depthwise convolutions (:mod:`.dynamic`);
- the output tail as ``pixel_shuffle`` + nearest upsample (:mod:`.model`).

Entry point: :func:`ane_form` (also :meth:`models.base.ESCBase.ane_form`).
"""
from .attention import AneAttention, AneBiasConstants
from .dynamic import dynamic_depthwise3x3_rank4
from .model import AneModel, ane_form

__all__ = ["AneAttention", "AneBiasConstants", "AneModel", "ane_form", "dynamic_depthwise3x3_rank4"]
