"""The ``esc::window_attention`` node: what every format agrees on, written once.

Why here: the plugin-form ONNX exporter writes this node, ONNX Runtime runs it through
its reference op, TensorRT's ONNX parser binds it to the Python plugin. If each of them
spelled the domain, name, attributes and IR version itself, they would drift; this module
sits below all of them (no project imports) so exporters and runners both read it.

Node layout (what TensorRT's ONNX parser needs to bind a Python plugin, TensorRT >= 10.9
``tensorrt.plugin``)::

    qkv (B, 3*heads*16, H, W) --+
                                 +--> esc::window_attention --> (B, heads*16, H, W)
    table (heads, (2w-1)^2) -----+    (initializer: the block's relative_position_bias)

* ``op_type`` = ``window_attention``: the plugin *name*, as registered with
  ``@trtp.register("esc::window_attention")``;
* node ``name``: the block's (``blocks.N.attn/window_attention``), unique, as ONNX Runtime
  requires. Which name TensorRT's creator receives depends on the parser: onnx-tensorrt 10.6
  (read from its source) calls ``createPlugin`` with the node's *name*, onnx-tensorrt 10.15
  with the ``op_type`` ("QDP framework relies on the name passed to createPlugin() being
  exactly equal to the registered plugin name"); NVIDIA's QDP sample names its ONNX node
  after the op in 10.9 and ``circ_pad_plugin 0`` from 10.10 on. ``tensorrt.plugin`` looks the
  plugin up as ``QDP_REGISTRY[f"{namespace}::{name}"]``, so with the node name it fails
  (KeyError). :mod:`runtimes.plugin_ops.tensorrt_plugin` therefore registers a creator that
  creates the plugin under its registered name whatever name the parser passes;
* string attribute ``plugin_namespace`` = ``"esc"``: the plugin *namespace* (10.10+ also
  accept the node's domain);
* int attribute ``aot``: 1 asks the parser for the plugin's ahead-of-time implementation
  (``QuickPluginCreationRequest.STRICT_AOT``: the Triton kernel compiled to PTX and embedded
  in the engine), 0 for the JIT ``@trtp.impl`` (``STRICT_JIT``: a Python callback at run time);
* int attributes ``window`` and ``heads``: the plugin's attributes. The parser reads
  ``plugin_namespace``, ``plugin_version`` and ``aot`` itself and hands the creator only the
  fields the creator declares (``field_names``), each INT attribute as a one-element INT32
  field; a declared field missing from the node is only a warning, so the node must carry
  both. Other attributes would be ignored; the node carries nothing else anyway;
* domain ``esc`` (opset ``esc`` version 1), so ``onnx.checker`` accepts the graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    from onnx.defs import OpSchema

__all__ = [
    "AOT_ATTRIBUTE",
    "ATTENTION_LABEL",
    "IR_VERSION",
    "NAMESPACE_ATTRIBUTE",
    "PLUGIN_ATTRIBUTES",
    "PLUGIN_DOMAIN",
    "PLUGIN_DOMAIN_VERSION",
    "PLUGIN_ID",
    "PLUGIN_NAME",
    "PLUGIN_NAMESPACE",
    "has_plugin_nodes",
    "is_plugin_node",
    "make_plugin_node",
    "op_schema",
    "plugin_attributes",
]

PLUGIN_NAME = "window_attention"
PLUGIN_NAMESPACE = "esc"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_DOMAIN = "esc"
PLUGIN_DOMAIN_VERSION = 1
NAMESPACE_ATTRIBUTE = "plugin_namespace"
AOT_ATTRIBUTE = "aot"
PLUGIN_ATTRIBUTES = ("window", "heads")
#: ``esc.attention`` of a plugin-form artifact.
ATTENTION_LABEL = "plugin"
#: onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13 (10 is safe).
IR_VERSION = 10


def plugin_attributes(window: int, heads: int, aot: bool = True) -> dict[str, Any]:
    """The attributes a plugin node carries, and nothing else (see the module docstring)."""
    return {"window": int(window), "heads": int(heads), NAMESPACE_ATTRIBUTE: PLUGIN_NAMESPACE,
            AOT_ATTRIBUTE: int(bool(aot))}


def make_plugin_node(qkv: str, table: str, output: str, window: int, heads: int, aot: bool = True,
                     name: str = "", domain: str = PLUGIN_DOMAIN) -> "onnx.NodeProto":
    """One plugin node (``onnx.helper``), laid out as TensorRT's parser binds it."""
    from onnx import helper

    return helper.make_node(PLUGIN_NAME, [qkv, table], [output], name=name or None, domain=domain,
                            **plugin_attributes(window, heads, aot))


def op_schema() -> "OpSchema":
    """The node's ``OpSchema`` (inputs, output, float type constraint, attributes).

    Exporters that emit the node through onnxscript need it: without a schema onnxscript
    cannot tell how many outputs the node has.
    """
    from onnx.defs import OpSchema

    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    return OpSchema(
        PLUGIN_NAME, PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION,
        doc="ESC window attention (reflect pad, windows, relative bias, softmax, merge, crop)",
        inputs=[OpSchema.FormalParameter("qkv", "T"), OpSchema.FormalParameter("table", "T")],
        outputs=[OpSchema.FormalParameter("out", "T")],
        type_constraints=[("T", types, "float types")],
        attributes=[OpSchema.Attribute("window", OpSchema.AttrType.INT, "window size"),
                    OpSchema.Attribute("heads", OpSchema.AttrType.INT, "attention heads"),
                    OpSchema.Attribute(NAMESPACE_ATTRIBUTE, OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                    OpSchema.Attribute(AOT_ATTRIBUTE, OpSchema.AttrType.INT, "1: TensorRT AOT implementation")])


def is_plugin_node(node: "onnx.NodeProto", domains: tuple[str, ...] = (PLUGIN_DOMAIN,)) -> bool:
    """Whether ``node`` is a window-attention plugin node (in one of ``domains``)."""
    return node.op_type == PLUGIN_NAME and node.domain in domains


def has_plugin_nodes(model: "onnx.ModelProto", domains: tuple[str, ...] = (PLUGIN_DOMAIN,)) -> bool:
    """Whether the graph (or one of its functions) holds a plugin node in one of ``domains``."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return any(is_plugin_node(n, domains) for n in nodes)
