"""Plugin-form ONNX: every window attention is ONE custom node (the TensorRT plugin's input).

>>> from models import load_model
>>> from export.plugin_onnx import export_plugin_onnx
>>> report = export_plugin_onnx(load_model("ESC_DIV2K_X4.pth"), "esc_x4.plugin.onnx")
>>> report.plugin_nodes        # one per block
5

Each block's attention (reflect padding, window partition, relative-position bias gather,
softmax, window merge and crop) becomes a single node between the ``to_qkv`` and
``to_out`` convolutions::

    qkv (B, 3*heads*16, H, W) --+
                                 +--> esc::window_attention --> (B, heads*16, H, W)
    table (heads, (2w-1)^2) -----+    (initializer: the block's relative_position_bias)

The node's layout (domain ``esc``, ``op_type`` ``window_attention``, attributes ``window``,
``heads``, ``plugin_namespace``, ``aot``) is the op's cross-format contract in
:mod:`runtimes.plugin_ops.contract`; TensorRT binds it to the Python plugin of
:mod:`runtimes.plugin_ops.tensorrt_plugin`, ONNX Runtime runs it through the reference op of
:mod:`runtimes.plugin_ops.onnxruntime_op`.

How: the model is exported with ``attention="fused"`` (each attention is already one
``esc::window_attention`` PyTorch custom op under ``torch.export``) through
``torch.onnx.export(dynamo=True, custom_translation_table={esc.window_attention: ...})``
whose translation emits the custom node. Tracing and clean-up reuse
:mod:`export.onnx_export` (compact dynamic-kernel trace, constant folding <= 1 MiB, DCE,
CSE, IR version 10, ``esc.*`` metadata through :class:`runtimes.metadata.ArtifactMetadata`
with ``esc.attention = "plugin"``), then :func:`verify_plugin_graph` checks the result: no
``Softmax``, no ``Reshape`` to rank >= 6 (the windowing is inside the node), exactly
``n_blocks`` plugin nodes with the right attributes and an initializer table of the right
shape. An fp32 file is then loaded back through :func:`runtimes.load` (the reference op)
and compared with PyTorch by :func:`export.verify.verify_artifact` before it takes its name.

The graph is exported in the requested precision (fp32, fp16, bf16: weights, table and
activations), with float32 ``lr``/``sr`` (``Cast`` nodes at the boundary for fp16/bf16),
because TensorRT builds it as a *strongly typed* network: the precision lives in the
graph, not in builder flags.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.errors import ESCError
from runtimes.metadata import ArtifactMetadata, write_onnx_metadata
from runtimes.plugin_ops.contract import (
    AOT_ATTRIBUTE,
    ATTENTION_LABEL,
    IR_VERSION,
    NAMESPACE_ATTRIBUTE,
    PLUGIN_DOMAIN,
    PLUGIN_DOMAIN_VERSION,
    PLUGIN_ID,
    PLUGIN_NAME,
    PLUGIN_NAMESPACE,
    is_plugin_node,
    op_schema,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from models import ESCBase

INPUT_NAME = "lr"
OUTPUT_NAME = "sr"
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BF16_MIN_OPSET = 22  # ONNX Conv (and most ops) accept bfloat16 from opset 22

Progress = Callable[[str], None]


class PluginExportError(ESCError, ValueError):
    """A plugin-form export that cannot be made or that failed verification."""


# -- the translation: esc::window_attention (PyTorch) -> esc.window_attention (ONNX) ---------------
_TRANSLATIONS: dict[bool, Any] = {}


def _translation(aot: bool):
    """The onnxscript function that emits the plugin node (built once per ``aot`` value).

    The custom op needs an explicit ``OpSchema``: without one onnxscript cannot tell how
    many outputs the node has, and the exporter would wire nothing to ``to_out``.
    """
    if aot in _TRANSLATIONS:
        return _TRANSLATIONS[aot]
    import onnxscript
    from onnxscript import opset18

    plugin_op = onnxscript.values.Op(onnxscript.values.Opset(PLUGIN_DOMAIN, PLUGIN_DOMAIN_VERSION), PLUGIN_NAME,
                                     op_schema())
    aot_value = int(bool(aot))

    def emit(qkv, table, window: int, heads: int):
        return plugin_op(qkv, table, window=window, heads=heads, plugin_namespace=PLUGIN_NAMESPACE, aot=aot_value)

    # A traced onnxscript function: the exporter calls ``emit`` on its symbolic values, so
    # the plugin node lands directly in the graph (no local function to inline).
    fn = onnxscript.values.TracedOnnxFunction(opset18, emit)
    _TRANSLATIONS[aot] = fn
    return fn


def custom_translation_table(aot: bool = True) -> dict:
    """``export.onnx_export``'s table plus the plugin translation for ``esc::window_attention``."""
    import models.kernels.ops  # noqa: F401  (registers torch.ops.esc.window_attention)
    from export import onnx_export as ox

    table = dict(ox.custom_translation_table())
    table[torch.ops.esc.window_attention.default] = _translation(aot)
    return table


# -- prepare and trace --------------------------------------------------------------------------------
def prepare_plugin_model(model: "ESCBase", precision: str = "fp32") -> "ESCBase":
    """A CPU copy of ``model`` in ``precision``, deployed without the dense bias cache, fused attention.

    The caller's model is not modified. ``deploy(precompute_bias=False)`` keeps the small
    ``(heads, (2w-1)^2)`` table, which becomes the plugin node's second input.
    """
    if precision not in DTYPES:
        raise PluginExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    memo = {id(attn.cached_bias): None for attn in model.attention_modules() if attn.cached_bias is not None}
    prepared = copy.deepcopy(model, memo).to("cpu").float()
    prepared.deploy(precompute_bias=False)
    prepared.set_attention("fused")
    return prepared.to(DTYPES[precision]).eval()


@contextlib.contextmanager
def _trace_context(model: "ESCBase", dtype: torch.dtype) -> Iterator[None]:
    """``export.onnx_export``'s tracing context: compact dynamic kernel, quiet loggers, size-oblivious."""
    from export import onnx_export as ox

    model.set_dynamic_kernel_form("conv")   # model is the prepared copy
    with ox._export_context(), ox._backed_size_oblivious():
        yield


def trace_plugin_model(prepared: "ESCBase", shape: Any = "dynamic", batch: Any = "dynamic") -> torch.export.ExportedProgram:
    """``torch.export`` of a prepared (fused) model; dynamic sides trace a size that pads twice."""
    from export import onnx_export as ox

    shape, batch = ox.parse_shape(shape), ox.parse_batch(batch)
    dtype = next(prepared.parameters()).dtype
    window = prepared.config.window_size
    h, w = ox.example_size(window) if shape == "dynamic" else shape
    n = 2 if batch == "dynamic" else batch
    example = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    dims: dict[int, Any] = {}
    if batch == "dynamic":
        dims[0] = torch.export.Dim("batch", min=1)
    if shape == "dynamic":
        dims[2] = torch.export.Dim("height", min=1)
        dims[3] = torch.export.Dim("width", min=1)
    with _trace_context(prepared, dtype):
        return torch.export.export(prepared, (example,), dynamic_shapes=(dims,) if dims else None, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


def translate_plugin(program: torch.export.ExportedProgram, opset: int = 18, aot: bool = True,
                     scale: int | None = None) -> "onnx.ModelProto":
    """ONNX for a traced fused model: plugin nodes, cleaned like :func:`export.onnx_export.translate`."""

    from export import onnx_export as ox

    table = custom_translation_table(aot)
    with ox._export_context():   # the ONNX exporter's quiet loggers and warnings
        onnx_program = torch.onnx.export(
            program, (), dynamo=True, opset_version=opset, optimize=False, verify=False, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], custom_translation_table=table)
        proto = ox.clean_graph(onnx_program.model)
    proto.ir_version = IR_VERSION
    _clean_names(proto, scale)
    return proto


def _clean_names(proto: "onnx.ModelProto", scale: int | None) -> None:
    """Drop node metadata, name the plugin nodes after their block, name the symbolic dims."""
    tables: dict[str, str] = {}
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        if is_plugin_node(node) and len(node.input) > 1:
            table = node.input[1]
            base = table[: -len(".relative_position_bias")] if table.endswith(".relative_position_bias") else table
            node.name = tables.setdefault(table, f"{base}/{PLUGIN_NAME}")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
    del proto.metadata_props[:]
    from export.onnx_export import name_dims

    name_dims(proto, scale)


def add_float32_io(proto: "onnx.ModelProto", elem_type: int) -> None:
    """float32 ``lr``/``sr`` around a reduced-precision graph: a ``Cast`` on each side (in place)."""
    from onnx import TensorProto, helper

    graph = proto.graph
    inner_in, inner_out = f"{INPUT_NAME}_cast", f"{OUTPUT_NAME}_cast"
    for node in graph.node:
        node.input[:] = [inner_in if n == INPUT_NAME else n for n in node.input]
        node.output[:] = [inner_out if n == OUTPUT_NAME else n for n in node.output]
    nodes = [helper.make_node("Cast", [INPUT_NAME], [inner_in], name="cast_lr", to=elem_type),
             *graph.node, helper.make_node("Cast", [inner_out], [OUTPUT_NAME], name="cast_sr", to=TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT
    graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT


# -- verification --------------------------------------------------------------------------------------
@dataclasses.dataclass
class PluginGraphInfo:
    """What :func:`verify_plugin_graph` found."""

    plugin_nodes: int
    node_names: list[str]
    window: int
    heads: int
    aot: bool
    histogram: Counter
    max_reshape_rank: int


def _constant_shapes(proto: "onnx.ModelProto") -> dict[str, tuple[int, ...]]:
    """name -> shape of every initializer and ``Constant`` output (values are not read)."""
    from onnx import numpy_helper

    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(numpy_helper.to_array(attr.t).shape)
    return shapes


def _value_ranks(proto: "onnx.ModelProto") -> dict[str, int]:
    ranks = {}
    for value in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


def verify_plugin_graph(proto: "onnx.ModelProto", n_blocks: int | None = None, window: int | None = None,
                        heads: int | None = None, domains: tuple[str, ...] = (PLUGIN_DOMAIN,)) -> PluginGraphInfo:
    """Check the plugin form; raise :class:`PluginExportError` naming every violation.

    * no ``Softmax`` node and no ``Reshape`` producing rank >= 6 (the attention and its
      window bookkeeping must all be inside the plugin nodes);
    * exactly ``n_blocks`` plugin nodes (when given), each with two inputs, one output,
      integer ``window``/``heads`` (equal to the given ones), ``plugin_namespace="esc"``
      and an ``aot`` flag, and nothing else;
    * each node's table is a graph initializer of shape ``(heads, (2*window-1)**2)``.
    """
    from onnx import helper

    problems: list[str] = []
    histogram = Counter(n.op_type for n in proto.graph.node)
    if histogram.get("Softmax"):
        problems.append(f"{histogram['Softmax']} Softmax node(s) remain outside the plugin")
    shapes = _constant_shapes(proto)
    ranks = _value_ranks(proto)
    max_rank = 0
    for node in proto.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        rank = max(ranks.get(node.output[0], 0),
                   shapes[node.input[1]][0] if len(node.input) > 1 and len(shapes.get(node.input[1], ())) == 1 else 0)
        max_rank = max(max_rank, rank)
        if rank >= 6:
            problems.append(f"Reshape {node.name or node.output[0]} produces a rank-{rank} tensor")
    initializers = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if is_plugin_node(n, domains)]
    found = {"window": set(), "heads": set(), AOT_ATTRIBUTE: set()}
    for node in nodes:
        label = node.name or node.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        expected = {"window", "heads", NAMESPACE_ATTRIBUTE, AOT_ATTRIBUTE}
        if set(attrs) != expected:
            problems.append(f"{label}: attributes {sorted(attrs)}, expected {sorted(expected)}")
        ns = attrs.get(NAMESPACE_ATTRIBUTE)
        if (ns.decode() if isinstance(ns, bytes) else ns) != PLUGIN_NAMESPACE:
            problems.append(f"{label}: plugin_namespace is {ns!r}, expected {PLUGIN_NAMESPACE!r}")
        for key in ("window", "heads", AOT_ATTRIBUTE):
            if not isinstance(attrs.get(key), int):
                problems.append(f"{label}: attribute {key} missing or not an int")
            else:
                found[key].add(attrs[key])
        if len(node.input) != 2 or len(node.output) != 1:
            problems.append(f"{label}: {len(node.input)} inputs and {len(node.output)} outputs, expected 2 and 1")
            continue
        w, h = attrs.get("window"), attrs.get("heads")
        table_shape = initializers.get(node.input[1])
        if table_shape is None:
            problems.append(f"{label}: table {node.input[1]!r} is not a graph initializer")
        elif isinstance(w, int) and isinstance(h, int) and table_shape != (h, (2 * w - 1) ** 2):
            problems.append(f"{label}: table shape {table_shape}, expected {(h, (2 * w - 1) ** 2)}")
    if n_blocks is not None and len(nodes) != n_blocks:
        problems.append(f"{len(nodes)} plugin node(s), expected one per block ({n_blocks})")
    for key, value in (("window", window), ("heads", heads)):
        if value is not None and found[key] - {value}:
            problems.append(f"{key} attribute(s) {sorted(found[key])}, expected {value}")
    if not nodes:
        problems.append(f"no {PLUGIN_DOMAIN}::{PLUGIN_NAME} node in the graph")
    if problems:
        raise PluginExportError("the plugin-form graph is wrong: " + "; ".join(problems))
    return PluginGraphInfo(
        plugin_nodes=len(nodes), node_names=[n.name for n in nodes], window=next(iter(found["window"])),
        heads=next(iter(found["heads"])), aot=bool(next(iter(found[AOT_ATTRIBUTE]))), histogram=histogram,
        max_reshape_rank=max_rank)


# -- the whole export ------------------------------------------------------------------------------------
@dataclasses.dataclass
class PluginExportReport:
    """What :func:`export_plugin_onnx` wrote and measured."""

    path: Path
    size_bytes: int
    opset: int
    precision: str
    shape: str
    batch: str
    variant: str
    scale: int
    window: int
    heads: int
    plugin_nodes: int
    nodes: int
    aot: bool
    weights_sha256: str
    metadata: dict[str, str]
    histogram: Counter
    parity: float | None            # max |ONNX Runtime (reference node) - PyTorch| on the probe
    probe_shape: tuple[int, ...] | None
    seconds: dict[str, float]

    def summary_rows(self) -> list[tuple[str, str]]:
        from export.common import human_size

        top = ", ".join(f"{op} {n}" for op, n in self.histogram.most_common(8))
        parity = ("not checked" if self.parity is None else
                  f"ONNX Runtime CPU (reference node) vs PyTorch on {'x'.join(map(str, self.probe_shape))}: "
                  f"max abs {self.parity:.2e}")
        weights = "RANDOM (no weights given)" if self.weights_sha256 == "random" else f"sha256 {self.weights_sha256[:16]}..."
        return [
            ("artifact", str(self.path)),
            ("size", human_size(self.size_bytes)),
            ("model", f"{self.variant} x{self.scale}, weights {weights}"),
            ("graph", f"opset {self.opset} + {PLUGIN_DOMAIN} {PLUGIN_DOMAIN_VERSION}, {self.precision} "
                      f"(I/O float32), shape {self.shape}, batch {self.batch}, {self.nodes} nodes"),
            ("plugin", f"{self.plugin_nodes} x {PLUGIN_ID} (window {self.window}, heads {self.heads}, "
                       f"{'AOT' if self.aot else 'JIT'} implementation requested)"),
            ("top ops", top),
            ("parity", parity),
            ("time", ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())),
        ]


def plugin_metadata(prepared: "ESCBase", opset: int, precision: str, shape: str, batch: str,
                    weights_sha256: str | None, aot: bool) -> ArtifactMetadata:
    """``esc.*`` metadata of a plugin-form file: the common schema plus the plugin's own keys."""
    attn = prepared.attention_modules()
    return ArtifactMetadata.from_model(
        prepared, weights_sha256, attention=ATTENTION_LABEL, opset=opset, precision=precision, io_dtype="float32",
        shape=shape, batch=batch, plugin=PLUGIN_ID, plugin_domain=PLUGIN_DOMAIN, plugin_aot="1" if aot else "0",
        plugin_window=attn[0].window, plugin_heads=attn[0].heads, n_blocks=len(attn))


def export_plugin_onnx(model: "ESCBase", path: str | Path, opset: int = 18, shape: Any = "dynamic",
                       weights_sha256: str | None = None, *, batch: Any = "dynamic", precision: str = "fp32",
                       aot: bool = True, check_parity: bool = True,
                       progress: Progress | None = None) -> PluginExportReport:
    """Write the plugin-form ONNX of ``model`` to ``path`` (atomically) and return a report.

    ``shape``: ``"dynamic"`` or ``"HxW"`` / ``(H, W)``; ``batch``: ``"dynamic"`` or N.
    ``precision``: ``fp32`` (default), ``fp16`` or ``bf16`` graph (float32 I/O); bf16 needs
    ``opset >= 22``.
    ``aot``: the node's ``aot`` attribute (TensorRT AOT vs JIT plugin implementation).
    ``check_parity``: before the file takes its name, load it through :func:`runtimes.load`
    (ONNX Runtime with the reference node; fp32 graphs only), run it on a probe the trace
    never saw and compare with the PyTorch model (``report.parity``: max abs error); beyond
    :func:`validation.compare.threshold_for` it raises :class:`export.verify.ExportParityError`
    and nothing is written.
    """
    import onnx
    from onnx import TensorProto

    from export import onnx_export as ox
    from export.common import atomic_output

    if opset not in ox.SUPPORTED_OPSETS:
        raise PluginExportError(f"opset {opset} is not supported: use one of {', '.join(map(str, ox.SUPPORTED_OPSETS))}")
    if precision not in PRECISIONS:
        raise PluginExportError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and opset < BF16_MIN_OPSET:
        raise PluginExportError(f"a bf16 graph needs opset >= {BF16_MIN_OPSET} (ONNX Conv accepts bfloat16 from "
                                f"opset 22), got opset {opset}: pass opset={BF16_MIN_OPSET}")
    bias = model.descriptor.bias
    if bias != "table":
        raise PluginExportError(
            f"the window-attention plugin gathers its bias from a relative-position table, and this "
            f"{model.descriptor.variant} model's bias is {bias} ({'FlashBias factors' if 'flashbias' in bias else 'no table'}):"
            f" export the mask-free form instead: python export/to_onnx.py --opset 23 (one Attention node per "
            f"block, no mask), or for TensorRT python export/to_trt.py --attention native")
    shape, batch = ox.parse_shape(shape), ox.parse_batch(batch)
    path = Path(path)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    if progress:
        progress(f"tracing {model.descriptor.variant} with fused attention ({precision}, shape {ox.shape_label(shape)})")
    prepared = prepare_plugin_model(model, precision)
    program = trace_plugin_model(prepared, shape, batch)
    seconds["trace"] = time.perf_counter() - start

    start = time.perf_counter()
    if progress:
        progress(f"translating to ONNX opset {opset} with {PLUGIN_ID} nodes")
    proto = translate_plugin(program, opset, aot, scale=prepared.scale)
    if precision != "fp32":
        add_float32_io(proto, TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16)
    attn = prepared.attention_modules()
    info = verify_plugin_graph(proto, n_blocks=len(attn), window=attn[0].window, heads=attn[0].heads)
    seconds["translate"] = time.perf_counter() - start

    meta = plugin_metadata(prepared, opset, precision, ox.shape_label(shape),
                           "dynamic" if batch == "dynamic" else str(batch), weights_sha256, aot)
    proto.producer_name = "esc-deploy"
    proto.producer_version = meta.toolkit_version
    proto.doc_string = (f"ESC {meta.variant} x{meta.scale}, window attention as {PLUGIN_ID} plugin nodes "
                        f"(TensorRT Python plugin / onnxruntime-extensions reference)")
    write_onnx_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)

    parity = probe_shape = None
    with atomic_output(path) as tmp:
        start = time.perf_counter()
        onnx.save_model(proto, str(tmp))
        seconds["save"] = time.perf_counter() - start
        if check_parity and precision == "fp32":
            start = time.perf_counter()
            if progress:
                progress("checking parity: the written file in ONNX Runtime (reference plugin node) vs PyTorch")
            from export.verify import verify_artifact

            h, w = ox.probe_size(prepared.config.window_size) if shape == "dynamic" else shape
            n = 1 if batch == "dynamic" else batch
            probe = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1234))
            result = verify_artifact(tmp, prepared, [probe], precision)[0]
            parity, probe_shape = result.max_abs, tuple(probe.shape)
            seconds["parity"] = time.perf_counter() - start
    metadata = meta.to_props()
    return PluginExportReport(
        path=path, size_bytes=path.stat().st_size, opset=opset, precision=precision, shape=meta.shape or "",
        batch=meta.batch or "", variant=meta.variant or "", scale=prepared.scale, window=info.window,
        heads=info.heads, plugin_nodes=info.plugin_nodes, nodes=len(proto.graph.node), aot=info.aot,
        weights_sha256=meta.weights_sha256 or "random", metadata=metadata, histogram=info.histogram, parity=parity,
        probe_shape=probe_shape, seconds=seconds)
