"""ONNX Runtime reference implementation of the ``esc::window_attention`` plugin node.

The plugin-form ONNX (:mod:`export.plugin_onnx`) is built for TensorRT, whose Python
plugin runs the fused Triton kernel. On the CPU the same node runs here, through an
onnxruntime-extensions Python custom operator that calls
:func:`models.kernels.reference.window_attention_reference` (the semantics every
implementation is tested against). It is a *reference*: correct, not fast (the output
goes back to ONNX Runtime as a Python list). fp32 graphs only.

Domains. onnxruntime-extensions puts a Python operator into ``ai.onnx.contrib`` unless
its ``op_type`` is written ``"domain::name"``. The operator is registered twice, as
``ai.onnx.contrib::window_attention`` and ``esc::window_attention``:

* :func:`prepare_for_onnxruntime` remaps the plugin nodes' domain ``esc`` ->
  ``ai.onnx.contrib`` (the documented home of Python custom operators), for a model
  handed to ONNX Runtime in memory;
* the ``esc`` registration lets ONNX Runtime load the unmodified *file* by path, which is
  how :class:`runtimes.onnx_runner.OnnxRunner` builds its session: its session-options
  hook (:func:`session_options_hook`) only has to register the custom-op library.

ONNX Runtime's TensorRT execution provider is not a route for this node: it binds TensorRT
plugins from C++ plugin libraries (``trt_extra_plugin_lib_paths``), while this plugin is a
TensorRT *Python* plugin (not tried here: no TensorRT on these machines). Build engines with
``export/to_trt.py``; in ONNX Runtime, use the CPU provider with this reference.
"""
from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from export.plugin_onnx import IR_VERSION, PLUGIN_DOMAIN, PLUGIN_NAME, is_plugin_node

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import onnxruntime as ort

__all__ = [
    "ORT_DOMAIN",
    "has_plugin_nodes",
    "make_session",
    "prepare_for_onnxruntime",
    "register_ort_ops",
    "run_plugin_onnx",
    "session_options_hook",
    "window_attention_numpy",
]

ORT_DOMAIN = "ai.onnx.contrib"
ORT_DOMAIN_VERSION = 1
_DOMAINS = (PLUGIN_DOMAIN, ORT_DOMAIN)
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


def has_plugin_nodes(model: "onnx.ModelProto") -> bool:
    """Whether the graph (or one of its functions) holds a window-attention plugin node."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return any(is_plugin_node(n, _DOMAINS) for n in nodes)


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
    if (moved or has_plugin_nodes(out)) and not any(d == ORT_DOMAIN for d, _ in imports):
        imports.append((ORT_DOMAIN, ORT_DOMAIN_VERSION))
    del out.opset_import[:]
    for domain, version in imports:
        entry = out.opset_import.add()
        entry.domain, entry.version = domain, version
    out.ir_version = min(out.ir_version or IR_VERSION, IR_VERSION)
    return out


def _library_path() -> str:
    from onnxruntime_extensions import get_library_path

    return get_library_path()


def session_options_hook(options: "ort.SessionOptions", info: Any) -> None:
    """``runtimes.onnx_runner`` session-options hook: register the custom-op library when needed.

    ``info`` is the runner's ``OnnxModelInfo`` (``custom_domains`` and ``proto`` are read
    lazily); graphs without a plugin node are left alone, so the hook costs nothing for
    ordinary ONNX files, and a file that cannot be read is left to ONNX Runtime to report.
    """
    try:
        domains = set(getattr(info, "custom_domains", ()) or ())
        if not domains & set(_DOMAINS):
            return
        proto = getattr(info, "proto", None)
        if proto is not None and not has_plugin_nodes(proto):
            return
    except Exception:   # an unreadable file: ONNX Runtime's own error will say why
        return
    register_ort_ops()
    options.register_custom_ops_library(_library_path())


def make_session(model: "onnx.ModelProto | str | bytes", threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> "ort.InferenceSession":
    """An ONNX Runtime session for a plugin-form model (a proto, a path or serialized bytes)."""
    import onnx
    import onnxruntime as ort

    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
    elif isinstance(model, str) or hasattr(model, "__fspath__"):
        proto = onnx.load(str(model))
    else:
        proto = model
    register_ort_ops()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.register_custom_ops_library(_library_path())
    return ort.InferenceSession(prepare_for_onnxruntime(proto).SerializeToString(), options,
                                providers=list(providers))


def run_plugin_onnx(model: "onnx.ModelProto | str | ort.InferenceSession", x: np.ndarray) -> np.ndarray:
    """Run ``lr`` -> ``sr`` of a plugin-form model on float32 ``x``; float32 out."""
    session = model if hasattr(model, "run") else make_session(model)
    inp = session.get_inputs()[0]
    return session.run(None, {inp.name: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(np.float32)
