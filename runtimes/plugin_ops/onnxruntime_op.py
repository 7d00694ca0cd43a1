"""ONNX Runtime reference implementation of the ``esc::window_attention`` plugin node.

The plugin-form ONNX is built for TensorRT, whose Python plugin runs the fused Triton
kernel. On the CPU the same node runs here, through an onnxruntime-extensions Python
custom operator that calls :func:`models.kernels.reference.window_attention_reference`
(the semantics every implementation is tested against). It is a *reference*: correct,
not fast (the output goes back to ONNX Runtime as a Python list). fp32 graphs only.

Domains. onnxruntime-extensions puts a Python operator into ``ai.onnx.contrib`` unless
its ``op_type`` is written ``"domain::name"``. The operator is registered twice, as
``ai.onnx.contrib::window_attention`` and ``esc::window_attention``:

* :func:`prepare_for_onnxruntime` remaps the plugin nodes' domain ``esc`` ->
  ``ai.onnx.contrib`` (the documented home of Python custom operators);
* the ``esc`` registration lets ONNX Runtime load the unmodified file, which is how every
  session is made: :func:`runtimes.onnx_runner.make_session` runs the session-options
  hooks, and :func:`session_options_hook` (registered there) adds the custom-op library
  to graphs that hold a plugin node. No session is created here.

ONNX Runtime's TensorRT execution provider is not a route for this node: it binds TensorRT
plugins from C++ plugin libraries (``trt_extra_plugin_lib_paths``), while this plugin is a
TensorRT *Python* plugin. Build engines with ``export/to_trt.py``; in ONNX Runtime, use the
CPU provider with this reference.
"""
from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from .contract import IR_VERSION, PLUGIN_DOMAIN, PLUGIN_NAME, has_plugin_nodes, is_plugin_node

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import onnxruntime as ort

__all__ = [
    "ORT_DOMAIN",
    "ORT_DOMAINS",
    "prepare_for_onnxruntime",
    "register_ort_ops",
    "run_plugin_onnx",
    "session_options_hook",
    "window_attention_numpy",
]

ORT_DOMAIN = "ai.onnx.contrib"
ORT_DOMAIN_VERSION = 1
#: The domains a plugin node may have in a graph handed to ONNX Runtime.
ORT_DOMAINS = (PLUGIN_DOMAIN, ORT_DOMAIN)
_LOCK = threading.Lock()
_REGISTERED = False


def window_attention_numpy(qkv: np.ndarray, table: np.ndarray, window: int, heads: int) -> np.ndarray:
    """The node's computation on numpy arrays (float32 in and out)."""
    import torch

    from models.kernels.reference import window_attention_reference

    out = window_attention_reference(torch.from_numpy(np.ascontiguousarray(qkv, dtype=np.float32)),
                                     torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)),
                                     int(window), int(heads))
    return out.numpy()


def register_ort_ops() -> None:
    """Declare the Python custom operator to onnxruntime-extensions (once per process).

    Raises ``ImportError`` with the install command when onnxruntime-extensions is missing.
    """
    global _REGISTERED
    with _LOCK:
        if _REGISTERED:
            return
        try:
            from onnxruntime_extensions import PyCustomOpDef, onnx_op
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "running the esc::window_attention plugin node in ONNX Runtime needs onnxruntime-extensions: "
                "pip install onnxruntime-extensions") from exc
        spec = {"inputs": [PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
                "outputs": [PyCustomOpDef.dt_float],
                "attrs": {"window": PyCustomOpDef.dt_int64, "heads": PyCustomOpDef.dt_int64}}
        # ai.onnx.contrib::window_attention (the remapped graph) and esc::window_attention (the file as is).
        onnx_op(op_type=PLUGIN_NAME, domain=ORT_DOMAIN, **spec)(window_attention_numpy)
        onnx_op(op_type=f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}", **spec)(window_attention_numpy)
        _REGISTERED = True


def prepare_for_onnxruntime(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """A copy of ``model`` whose plugin nodes live in ``ai.onnx.contrib`` (IR version <= 10).

    Only ``window_attention`` nodes of the ``esc`` domain move; the ``esc`` opset import is
    dropped when nothing else uses it and ``ai.onnx.contrib`` version 1 is imported.
    """
    out = copy.deepcopy(model)
    moved = 0
    for nodes in [out.graph.node, *[f.node for f in out.functions]]:
        for node in nodes:
            if is_plugin_node(node, (PLUGIN_DOMAIN,)):
                node.domain = ORT_DOMAIN
                moved += 1
    still_used = any(n.domain == PLUGIN_DOMAIN for n in out.graph.node) or any(
        n.domain == PLUGIN_DOMAIN for f in out.functions for n in f.node)
    imports = [(o.domain, o.version) for o in out.opset_import
               if not (o.domain == PLUGIN_DOMAIN and not still_used)]
    if (moved or has_plugin_nodes(out, ORT_DOMAINS)) and not any(d == ORT_DOMAIN for d, _ in imports):
        imports.append((ORT_DOMAIN, ORT_DOMAIN_VERSION))
    del out.opset_import[:]
    for domain, version in imports:
        entry = out.opset_import.add()
        entry.domain, entry.version = domain, version
    out.ir_version = min(out.ir_version or IR_VERSION, IR_VERSION)
    return out


def session_options_hook(options: "ort.SessionOptions", info: Any) -> None:
    """``runtimes.onnx_runner`` session-options hook: register the custom-op library when needed.

    ``info`` is the runner's ``OnnxModelInfo`` (``custom_domains`` and ``proto`` are read
    lazily); graphs without a plugin node are left alone, so the hook costs nothing for
    ordinary ONNX files, and a file that cannot be read is left to ONNX Runtime to report.
    """
    try:
        domains = set(getattr(info, "custom_domains", ()) or ())
        if not domains & set(ORT_DOMAINS):
            return
        proto = getattr(info, "proto", None)
        if proto is not None and not has_plugin_nodes(proto, ORT_DOMAINS):
            return
    except Exception:   # an unreadable file: ONNX Runtime's own error will say why
        return
    register_ort_ops()
    from onnxruntime_extensions import get_library_path

    options.register_custom_ops_library(get_library_path())


def run_plugin_onnx(model: "onnx.ModelProto | str | ort.InferenceSession", x: np.ndarray) -> np.ndarray:
    """Run a plugin-form model's first input -> first output on float32 ``x``; float32 out.

    ``model`` is a session, a proto or a path; sessions come from
    :func:`runtimes.onnx_runner.make_session`, whose hooks register this reference op.
    """
    if hasattr(model, "run"):
        session = model
    else:
        from runtimes.onnx_runner import make_session

        session = make_session(model)
    inp = session.get_inputs()[0]
    return session.run(None, {inp.name: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(np.float32)
