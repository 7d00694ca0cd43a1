"""TensorRT's side of the plugin path, as far as it is Python-visible: run with a staged ``tensorrt``.

``python tests/trt_qdp_driver.py CONFIG.json`` with ``PYTHONPATH=<trt_real.stage(...)>:<repo>``
registers the project's plugin with NVIDIA's real ``tensorrt.plugin`` of that version and
then does what TensorRT does with it, printing one JSON object:

1. **ONNX parser** (onnx-tensorrt's ``FallbackPluginImporter`` for a V3Quick creator): the
   creator is looked up by (``op_type``, ``plugin_version`` or "1", ``plugin_namespace``);
   only the fields the creator declares are taken from the node, an INT attribute as a
   one-element INT32 field, a STRING as CHAR with its NUL; ``aot`` gives ``STRICT_AOT`` /
   ``STRICT_JIT``; ``create_plugin`` gets the node's name (10.6, and NVIDIA's 10.9 sample) or
   its op type (10.15), both tried for every plugin node of the file.
2. **builder**, in its order: ``get_output_data_types``, ``get_output_shapes`` (symbolic
   dims from an ``IExprBuilder``), ``get_supported_format_combinations``,
   ``configure_plugin``, ``get_valid_tactics``, ``set_tactic``, ``get_launch_params``,
   ``get_kernel``; then the launch expressions are evaluated at concrete shapes and set
   beside what the Triton (JIT) launcher passes for the same shapes.
3. **JIT engine round trip**: ``get_fields_to_serialize`` fed back to ``create_plugin`` in
   the RUNTIME phase, as deserialisation does.
4. **another PTX target**: ``register_plugin`` again with ``retarget`` and the PTX the next
   plugin embeds.

Config keys: ``onnx`` (a plugin-form file), ``target``, ``retarget`` ([target, ptx_version]),
``dtypes``, ``shapes`` ([[B, H, W], ...]). Errors of a step are reported in its entry
(``"error": "KeyError: ..."``), not raised, so one run shows every step.
"""
import json
import re
import sys
import traceback

import numpy as np
import onnx
import tensorrt as trt
import tensorrt.plugin as trtp
import torch
from onnx import helper

from runtimes.plugin_ops import tensorrt_plugin
from runtimes.plugin_ops.contract import NAMESPACE_ATTRIBUTE, is_plugin_node

DTYPES = {"fp16": trt.DataType.HALF, "fp32": trt.DataType.FLOAT, "bf16": trt.DataType.BF16}
TORCH = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "where": traceback.format_exc(limit=-3)[-1500:]}


# -- 1. the ONNX parser ----------------------------------------------------------------------------------
def node_fields(node: onnx.NodeProto, creator) -> list:
    """onnx-tensorrt's ``loadFields``: the creator's declared fields that the node has, by attribute type."""
    attrs = {a.name: a for a in node.attribute}
    fields = []
    for declared in (creator.field_names[i] for i in range(len(creator.field_names))):
        attr = attrs.get(declared.name)
        if attr is None:
            continue   # the parser only warns; the plugin then lacks the attribute
        value = helper.get_attribute_value(attr)
        if attr.type == onnx.AttributeProto.INT:
            fields.append(trt.PluginField(declared.name, np.array([value], np.int32), trt.PluginFieldType.INT32))
        elif attr.type == onnx.AttributeProto.INTS:
            fields.append(trt.PluginField(declared.name, np.array(value, np.int32), trt.PluginFieldType.INT32))
        elif attr.type == onnx.AttributeProto.FLOAT:
            fields.append(trt.PluginField(declared.name, np.array([value], np.float32), trt.PluginFieldType.FLOAT32))
        elif attr.type == onnx.AttributeProto.STRING:
            fields.append(trt.PluginField(declared.name, np.frombuffer(value + b"\0", np.int8),
                                          trt.PluginFieldType.CHAR))
        else:
            raise TypeError(f"attribute {declared.name} of type {attr.type} is unsupported as a plugin field")
    return fields


def parse_node(node: onnx.NodeProto, name_source: str, phase=None):
    """``(plugin, request)`` for a plugin node, as TensorRT's ONNX parser creates it."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    namespace = attrs.get(NAMESPACE_ATTRIBUTE, b"").decode()
    version = attrs.get("plugin_version", b"1")
    creator = trt.get_plugin_registry().get_creator(node.op_type, version.decode() if isinstance(version, bytes)
                                                    else version, namespace)
    if creator is None:
        raise LookupError("Plugin not found, are the plugin name, version, and namespace correct?")
    fields = trt.PluginFieldCollection_(trt.PluginFieldCollection(node_fields(node, creator)))
    if "aot" in attrs:
        request = (trt.QuickPluginCreationRequest.STRICT_AOT if attrs["aot"]
                   else trt.QuickPluginCreationRequest.STRICT_JIT)
    else:
        request = trt.QuickPluginCreationRequest.UNKNOWN
    name = node.name if name_source == "node" else node.op_type
    return creator.create_plugin(name, namespace, fields, phase or trt.TensorRTPhase.BUILD, request), request


# -- 2. the builder ---------------------------------------------------------------------------------------
def _dims(values) -> "trt.Dims":
    return trt.Dims(list(values))


def _tensor_desc(dtype, dims) -> "trt.DynamicPluginTensorDesc":
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.type, desc.desc.format, desc.desc.dims = dtype, trt.TensorFormat.LINEAR, _dims(dims)
    return desc


def build(plugin, qkv_dtype, table_dtype, channels: int, table_shape) -> dict:
    """The builder's calls on one plugin; returns the expressions and the kernel."""
    builder = trt.IExprBuilder()
    qkv = trt.DimsExprs([trt.IExprBuilder._input("B"), builder.constant(channels), trt.IExprBuilder._input("H"),
                         trt.IExprBuilder._input("W")])
    table = trt.DimsExprs([builder.constant(v) for v in table_shape])
    out_types = plugin.get_output_data_types([qkv_dtype, table_dtype], [4, 2])
    out_shapes = plugin.get_output_shapes([qkv, table], [], builder)
    in_out = [_tensor_desc(qkv_dtype, (-1, channels, -1, -1)), _tensor_desc(table_dtype, table_shape),
              _tensor_desc(out_types[0], (-1, -1, -1, -1))]
    combos = plugin.get_supported_format_combinations(in_out, 2)
    plugin.configure_plugin(in_out[:2], in_out[2:])
    tactics = plugin.get_valid_tactics()
    plugin.set_tactic(tactics[0] if tactics else 0)
    launch, extra = trt.KernelLaunchParams._for_builder(), trt.ISymExprs._for_builder()
    plugin.get_launch_params([qkv, table], in_out, 2, launch, extra, builder)
    descs = [d.desc for d in in_out]
    kernel_name, ptx = plugin.get_kernel(descs[:2], descs[2:])
    return {"out_types": out_types, "out_shape": out_shapes[0], "combos": combos, "launch": launch, "extra": extra,
            "kernel": kernel_name, "ptx": ptx.decode() if isinstance(ptx, bytes) else ptx}


def ptx_facts(ptx: str, entry: str) -> dict:
    match = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    return {"entry": bool(match), "target": re.search(r"\.target\s+(\S+)", ptx).group(1),
            "version": re.search(r"\.version\s+(\S+)", ptx).group(1),
            "params": re.findall(r"\.param\s+\.(\w+)", match.group(1)) if match else [], "text": ptx}


def triton_launch(shape, window: int, heads: int, dtype) -> dict:
    """What :func:`window_attention_triton` passes its kernel for ``shape`` (meta tensors, nothing runs)."""
    from models.kernels import window_attention_triton as wat

    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append({"grid": list(grid), "scalars": list(args[3:8])})

    real, wat._window_attention_fwd = wat._window_attention_fwd, Recorder()
    try:
        b, h, w = shape
        qkv = torch.empty(b, 3 * 16 * heads, h, w, dtype=dtype, device="meta")
        table = torch.empty(heads, (2 * window - 1) ** 2, dtype=dtype, device="meta")
        wat.window_attention_triton(qkv, table, window, heads, block_m=tensorrt_plugin.DEFAULT_BLOCK_M,
                                    block_n=tensorrt_plugin.DEFAULT_BLOCK_N)
    finally:
        wat._window_attention_fwd = real
    return calls[0]


def evaluate(result: dict, shapes) -> dict:
    """The launch expressions at concrete shapes (what TensorRT computes per call)."""
    launch, extra = result["launch"], result["extra"]
    out = {}
    def value(sym, dims: dict) -> int:
        return sym._state["expr"]._evaluate(dims)

    for b, h, w in shapes:
        dims = {"B": b, "H": h, "W": w}
        out[f"{b}x{h}x{w}"] = {
            "grid": [value(launch.grid_x, dims), value(launch.grid_y, dims), value(launch.grid_z, dims)],
            "block": [value(launch.block_x, dims), value(launch.block_y, dims), value(launch.block_z, dims)],
            "shared": value(launch.shared_mem, dims),
            "scalars": [value(extra[i], dims) for i in range(len(extra))],
            "out_shape": [result["out_shape"][i]._evaluate(dims) for i in range(len(result["out_shape"]))]}
    return out


def main(config: dict) -> dict:
    report: dict = {"tensorrt": trt.__version__, "plugin_api": {n: hasattr(trtp, n) for n in (
        "register", "impl", "aot_impl", "TensorDesc", "KernelLaunchParams", "SymIntExprs", "SymInt32", "cdiv", "max",
        "from_shape_expr")}}
    report["registered"] = {k: v for k, v in tensorrt_plugin.register_plugin(target=config["target"]).items()
                            if k in ("registered", "aot", "target", "ptx_version")}
    creator = trt.get_plugin_registry().get_creator("window_attention", "1", "esc")
    report["declared_fields"] = [[f.name, f.type.name] for f in
                                 (creator.field_names[i] for i in range(len(creator.field_names)))]
    model = onnx.load(config["onnx"])
    nodes = [n for n in model.graph.node if is_plugin_node(n)]
    initializers = {t.name: tuple(t.dims) for t in model.graph.initializer}
    report["create"] = {}
    for source in ("node", "op_type"):
        try:
            made = [parse_node(node, source) for node in nodes]
            report["create"][source] = {"plugins": len(made), "request": made[0][1].name,
                                        "class": type(made[0][0]).__name__, "attrs": {
                                            k: np.asarray(v).tolist() for k, v in made[0][0].attrs.items()}}
        except Exception as exc:  # noqa: BLE001 - reported per step
            report["create"][source] = _error(exc)
    node_attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    window, heads = int(node_attrs["window"]), int(node_attrs["heads"])
    table_shape = initializers[nodes[0].input[1]]
    report["build"] = {}
    for name in config["dtypes"]:
        try:
            plugin, _ = parse_node(nodes[0], "op_type")
            result = build(plugin, DTYPES[name], DTYPES[name], 3 * 16 * heads, table_shape)
            report["build"][name] = {
                "out_dtype": result["out_types"][0].name, "kernel": result["kernel"],
                "combos": [[d.type.name, d.format.name] for d in result["combos"]],
                "ptx": ptx_facts(result["ptx"], result["kernel"]),
                "at": evaluate(result, config["shapes"]),
                "triton": {f"{b}x{h}x{w}": triton_launch((b, h, w), window, heads, TORCH[name])
                           for b, h, w in config["shapes"]}}
        except Exception as exc:  # noqa: BLE001 - reported per step
            report["build"][name] = _error(exc)
    try:
        jit_node = onnx.NodeProto()
        jit_node.CopyFrom(nodes[0])
        next(a for a in jit_node.attribute if a.name == "aot").i = 0   # the file as --jit writes it
        plugin, request = parse_node(jit_node, "node")
        plugin.get_output_data_types([DTYPES["fp16"], DTYPES["fp16"]], [4, 2])
        serialized = plugin.get_fields_to_serialize()
        fields = trt.PluginFieldCollection_(trt.PluginFieldCollection(list(serialized)))
        again = creator.create_plugin("window_attention", "esc", fields, trt.TensorRTPhase.RUNTIME,
                                      trt.QuickPluginCreationRequest.STRICT_JIT)
        report["jit"] = {"request": request.name, "class": type(plugin).__name__,
                         "serialized": [[f.name, f.type.name, f.data.tolist()] for f in serialized],
                         "deserialized": {k: np.asarray(v).tolist() for k, v in again.attrs.items()}}
    except Exception as exc:  # noqa: BLE001 - reported per step
        report["jit"] = _error(exc)
    if config.get("retarget"):
        try:
            target, ptx_version = config["retarget"]
            state = tensorrt_plugin.register_plugin(target=target, ptx_version=ptx_version)
            plugin, _ = parse_node(nodes[0], "op_type")
            result = build(plugin, DTYPES["fp16"], DTYPES["fp16"], 3 * 16 * heads, table_shape)
            facts = ptx_facts(result["ptx"], result["kernel"])
            report["retarget"] = {"state": [state["target"], state["ptx_version"]], "target": facts["target"],
                                  "version": facts["version"]}
        except Exception as exc:  # noqa: BLE001 - reported per step
            report["retarget"] = _error(exc)
    return report


if __name__ == "__main__":
    print(json.dumps(main(json.loads(open(sys.argv[1]).read()))))
