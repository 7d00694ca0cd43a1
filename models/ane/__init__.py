"""The Apple Neural Engine form of an ESC model (a model option, like ``set_attention``).

Why a separate form: the form exporters use elsewhere is shaped for ONNX/TensorRT and
for any input size; read as the Neural Engine's compiler reads it, it gathers the
relative-position bias at every call, emits reflect-padding index math even for
window-multiple inputs, goes through rank-5 tensors and moves the qkv map through many
transposes. The ANE form computes the same function (fp32 parity is tested) with:

- window attention in the Neural Engine's channels-first layout: one einsum per head,
  softmax on the channel axis, three transposes per block (:mod:`.attention`);
- the dense relative-position bias stored as one constant per head and query chunk;
- every intermediate within a tensor budget (default 8 MiB of fp16, :mod:`.budget`):
  attention scores chunked by windows and queries, ConvFFN hidden maps (:mod:`.ffn`) and
  the dynamic 3x3's shifts (:mod:`.dynamic`) by channels;
- padding only when a side is not a window multiple, as a ``pad`` op where that is legal;
- the output tail as one ``pixel_shuffle``, the image skip a constant one-hot 1x1
  convolution (:mod:`.model`);
- two contingencies behind flags, off by default (:mod:`.contingency`).

Entry point: :func:`ane_form` (also :meth:`models.base.ESCBase.ane_form`).
"""
from .attention import AneAttention, AneWindowAttention
from .budget import DEFAULT_BUDGET_BYTES
from .contingency import ConstantWeightMean, conv_in_pieces
from .dynamic import dynamic_depthwise3x3_rank4
from .model import AneModel, ane_form, skip_weight

__all__ = ["DEFAULT_BUDGET_BYTES", "AneAttention", "AneModel", "AneWindowAttention", "ConstantWeightMean", "ane_form",
           "conv_in_pieces", "dynamic_depthwise3x3_rank4", "skip_weight"]
