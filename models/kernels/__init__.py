"""Fused window-attention kernels for ESC.

ESC's window attention (reflect-pad to a multiple of the window, partition into
``w x w`` windows, multi-head attention with a relative-position bias table,
window reverse, crop) is the dominant cost of the network at HD sizes. This
package holds:

* :mod:`models.kernels.reference` -- the naive torch-only definition of the
  operation; the single source of truth for its semantics and the CPU /
  ONNX Runtime custom-op fallback.
* :mod:`models.kernels.window_attention_triton` -- a Triton kernel that does the
  whole thing in one pass straight from the NCHW ``qkv`` map.
* :mod:`models.kernels.ops` -- the ``esc::window_attention`` ``torch.library``
  custom op that dispatches between the two.

Nothing is imported here on purpose: importing the package must not pull in
Triton (absent or unusable on many deployment hosts).
"""
