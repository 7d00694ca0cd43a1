"""Attention forms for ONNX Runtime's CPU provider: graph rewrites with the same arithmetic.

Why: ONNX Runtime's CPU kernels compute a window attention's scores for every window at
once. ESC's decomposed attention (opset 18: MatMul, Add bias, Softmax, MatMul) holds
several (windows, heads, 1024, 1024) fp32 tensors, 256 MB each for a 128x128 input; its
native ``Attention`` (opset 23) and the contrib ``MultiHeadAttention`` have no flash path
once a bias is present, so they hold one. The forms (measured on esc x4 at 128x128; the
table is in :mod:`export.onnx_export`'s docstring):

- ``native``: the graph as translated.
- ``chunked``: each attention's queries are split into ``chunks`` row slices; every slice
  runs the same attention (its rows of the bias, all keys and values), then the slices are
  concatenated. Softmax rows are independent, so the result is the same sum for every row;
  ONNX Runtime's planner reuses one slice's score buffer for the next, dividing the score
  memory by ``chunks``. Works on both forms: native ``Attention`` nodes and decomposed
  ``MatMul -> [Add] -> Softmax -> MatMul`` chains.
- ``mha``: each native ``Attention`` becomes ``com.microsoft.MultiHeadAttention`` with the
  bias as ``attention_bias`` (q, k, v moved to its (batch, tokens, heads * d) layout).
  Measured worse than ``native`` on the CPU; kept as a choice for execution providers
  with fused kernels for it (CUDA's memory-efficient attention takes a bias).

The rewrites need the number of query rows and heads as numbers, which every export here
has (window^2 tokens, fixed heads): only the windows axis is dynamic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import onnx

ATTENTION_FORMS = ("native", "chunked", "mha")
DEFAULT_CHUNKS = 16
CONTRIB_DOMAIN = "com.microsoft"


class AttentionRewriteError(ValueError):
    """A graph whose attention this module cannot rewrite (the message says which node and why)."""


@dataclass
class _Builder:
    """New nodes and int64 constants for one rewrite pass."""

    constants: dict[str, np.ndarray] = field(default_factory=dict)

    def const(self, name: str, values: list[int]) -> str:
        self.constants[name] = np.asarray(values, dtype=np.int64)
        return name

    def finish(self, proto: "onnx.ModelProto") -> None:
        from onnx import numpy_helper

        have = {t.name for t in proto.graph.initializer}
        proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in self.constants.items() if k not in have)


def rewrite_attention(proto: "onnx.ModelProto", form: str, chunks: int = DEFAULT_CHUNKS) -> int:
    """Rewrite ``proto``'s attention in place to ``form``; returns how many attentions changed."""
    if form not in ATTENTION_FORMS:
        raise AttentionRewriteError(f"attention form must be one of {', '.join(ATTENTION_FORMS)}, got {form!r}")
    if form == "native":
        return 0
    if form == "chunked" and chunks < 2:
        raise AttentionRewriteError(f"chunked attention needs at least 2 query chunks, got {chunks}")
    shapes = _known_shapes(proto)
    builder = _Builder()
    graph_nodes = list(proto.graph.node)
    position = {node.name: i for i, node in enumerate(graph_nodes)}
    if len(position) != len(graph_nodes):
        raise AttentionRewriteError("the graph has unnamed or duplicate node names; attention cannot be rewritten")
    replaced: dict[int, list] = {}       # position of a pattern's first node -> new nodes
    dropped: set[int] = set()            # positions of the other nodes of replaced patterns
    for i, node in enumerate(graph_nodes):
        if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
            rows, heads, head_dim = _q_dims(node.name, shapes.get(node.input[0]))
            replaced[i] = (_chunk_native(builder, node, i, rows, chunks, shapes) if form == "chunked"
                           else _mha(builder, node, i, heads, head_dim))
    if form == "chunked":
        for chain in _decomposed_chains(graph_nodes):
            i = position[chain.scores.name]
            rows = _q_dims(chain.softmax.name, shapes.get(chain.scores.input[0]))[0]
            replaced[i] = _chunk_decomposed(builder, chain, i, rows, chunks, shapes)
            dropped.update(position[n.name] for n in chain.nodes[1:])
    nodes = []
    for i, node in enumerate(graph_nodes):
        if i not in dropped:
            nodes.extend(replaced.get(i, [node]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    if form == "mha" and replaced and not any(o.domain == CONTRIB_DOMAIN for o in proto.opset_import):
        from onnx import helper

        proto.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    builder.finish(proto)
    return len(replaced)


# -- shapes --------------------------------------------------------------------------------------------
def _known_shapes(proto: "onnx.ModelProto") -> dict[str, list]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.value_info, *inferred.graph.input]}


def _q_dims(name: str, shape: list | None) -> tuple[int, int, int]:
    """(rows, heads, head_dim) of a 4-D (windows, heads, rows, head_dim) query."""
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise AttentionRewriteError(
            f"attention {name!r}: the query must be 4-D (windows, heads, tokens, head_dim) with known heads, tokens "
            f"and head_dim, got {shape}; export with attention form 'native' instead")
    return shape[2], shape[1], shape[3]


def _chunk_sizes(builder: _Builder, name: str, rows: int, chunks: int) -> str:
    if rows % chunks:
        raise AttentionRewriteError(f"attention {name!r}: {rows} query rows do not split into {chunks} equal chunks; "
                                    f"pick a divisor of {rows}")
    return builder.const(f"attention_chunks_{rows}_{chunks}", [rows // chunks] * chunks)


# -- chunked: native Attention ---------------------------------------------------------------------------
def _row_mask(mask: str | None, rows: int, shapes: dict[str, list]) -> tuple[str | None, bool]:
    """(mask, whether to split it): a bias broadcast along the rows is passed whole to every chunk."""
    if not mask:
        return None, False
    shape = shapes.get(mask)
    return mask, shape is not None and len(shape) >= 2 and shape[-2] == rows


def _chunk_native(builder: _Builder, node, index: int, rows: int, chunks: int, shapes: dict[str, list]) -> list:
    """Split q (and the mask rows) into ``chunks``; one Attention per chunk; concat the rows."""
    from onnx import helper

    sizes = _chunk_sizes(builder, node.name, rows, chunks)
    prefix = f"attention{index}_chunk"
    q, k, v = node.input[:3]
    mask, split_mask = _row_mask(node.input[3] if len(node.input) > 3 else None, rows, shapes)
    q_parts = [f"{prefix}_q{j}" for j in range(chunks)]
    m_parts = [f"{prefix}_mask{j}" for j in range(chunks)] if split_mask else [mask] * chunks
    outs = [f"{prefix}_out{j}" for j in range(chunks)]
    nodes = [helper.make_node("Split", [q, sizes], q_parts, name=f"{prefix}_split_q", axis=2)]
    if split_mask:
        nodes.append(helper.make_node("Split", [mask, sizes], m_parts, name=f"{prefix}_split_mask", axis=-2))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for j in range(chunks):
        inputs = [q_parts[j], k, v] + ([m_parts[j]] if mask else [])
        nodes.append(helper.make_node("Attention", inputs, [outs[j]], name=f"{prefix}{j}", **attrs))
    nodes.append(helper.make_node("Concat", outs, [node.output[0]], name=f"{prefix}_concat", axis=2))
    return nodes


# -- chunked: decomposed MatMul -> [Add] -> Softmax -> MatMul -------------------------------------------------
@dataclass
class _Chain:
    scores: "onnx.NodeProto"             # MatMul(q, k^T)
    bias: "onnx.NodeProto | None"        # Add(scores, bias)
    softmax: "onnx.NodeProto"
    output: "onnx.NodeProto"             # MatMul(probs, v)

    @property
    def nodes(self) -> list:
        return [n for n in (self.scores, self.bias, self.softmax, self.output) if n is not None]


def _decomposed_chains(graph_nodes: list) -> list[_Chain]:
    """Every last-axis Softmax fed by MatMul (optionally plus a bias) and read by one MatMul."""
    producer = {o: n for n in graph_nodes for o in n.output}
    readers: dict[str, list] = {}
    for n in graph_nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    chains = []
    for node in graph_nodes:
        if node.op_type != "Softmax" or {a.name: a.i for a in node.attribute}.get("axis", -1) not in (-1, 3):
            continue
        before = producer.get(node.input[0])
        bias = before if before is not None and before.op_type == "Add" else None
        scores = before
        if bias is not None:   # the scores side of the Add is the MatMul; the other side is the bias
            sides = [producer.get(name) for name in bias.input]
            scores = next((n for n in sides if n is not None and n.op_type == "MatMul"), None)
        after = readers.get(node.output[0], [])
        if (scores is None or scores.op_type != "MatMul" or len(after) != 1 or after[0].op_type != "MatMul"
                or after[0].input[0] != node.output[0]
                or any(len(readers.get(n.output[0], [])) != 1 for n in (scores, bias) if n is not None)):
            continue
        chains.append(_Chain(scores, bias, node, after[0]))
    return chains


def _chunk_decomposed(builder: _Builder, chain: _Chain, index: int, rows: int, chunks: int,
                      shapes: dict[str, list]) -> list:
    from onnx import helper

    sizes = _chunk_sizes(builder, chain.softmax.name, rows, chunks)
    prefix = f"attention{index}_rows"
    q, k_t = chain.scores.input[:2]
    bias = next(name for name in chain.bias.input if name != chain.scores.output[0]) if chain.bias else None
    mask, split_mask = _row_mask(bias, rows, shapes)
    v = chain.output.input[1]
    q_parts = [f"{prefix}_q{j}" for j in range(chunks)]
    m_parts = [f"{prefix}_mask{j}" for j in range(chunks)] if split_mask else [mask] * chunks
    nodes = [helper.make_node("Split", [q, sizes], q_parts, name=f"{prefix}_split_q", axis=-2)]
    if split_mask:
        nodes.append(helper.make_node("Split", [mask, sizes], m_parts, name=f"{prefix}_split_mask", axis=-2))
    axis = {a.name: a.i for a in chain.softmax.attribute}.get("axis", -1)
    outs = []
    for j in range(chunks):
        s = f"{prefix}{j}_scores"
        nodes.append(helper.make_node("MatMul", [q_parts[j], k_t], [s], name=f"{prefix}{j}_qk"))
        if mask:
            nodes.append(helper.make_node("Add", [s, m_parts[j]], [f"{s}_bias"], name=f"{prefix}{j}_bias"))
            s = f"{s}_bias"
        nodes.append(helper.make_node("Softmax", [s], [f"{prefix}{j}_probs"], name=f"{prefix}{j}_softmax", axis=axis))
        outs.append(f"{prefix}{j}_out")
        nodes.append(helper.make_node("MatMul", [f"{prefix}{j}_probs", v], [outs[-1]], name=f"{prefix}{j}_pv"))
    nodes.append(helper.make_node("Concat", outs, [chain.output.output[0]], name=f"{prefix}_concat", axis=-2))
    return nodes


# -- mha ---------------------------------------------------------------------------------------------------
def _mha(builder: _Builder, node, index: int, heads: int, head_dim: int) -> list:
    """(B, N, S, d) q/k/v -> (B, S, N * d) -> com.microsoft.MultiHeadAttention -> back to (B, N, S, d)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("is_causal") or attrs.get("softcap"):
        raise AttentionRewriteError(f"attention {node.name!r} is causal or soft-capped; the 'mha' form does not apply")
    prefix = f"attention{index}_mha"
    flat = builder.const("attention_mha_flat", [0, 0, -1])
    split = builder.const(f"attention_mha_heads_{heads}_{head_dim}", [0, 0, heads, head_dim])
    nodes, flat_inputs = [], []
    for name, tensor in zip("qkv", node.input[:3]):
        t, r = f"{prefix}_{name}_bsnd", f"{prefix}_{name}_bsd"
        nodes += [helper.make_node("Transpose", [tensor], [t], name=f"{prefix}_{name}_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [t, flat], [r], name=f"{prefix}_{name}_r")]
        flat_inputs.append(r)
    mask = node.input[3] if len(node.input) > 3 else ""
    out, split_out = f"{prefix}_out_bsd", f"{prefix}_out_bsnd"
    extra = {"scale": attrs["scale"]} if attrs.get("scale") else {}
    nodes += [helper.make_node("MultiHeadAttention", [*flat_inputs, "", "", mask], [out], name=prefix,
                               domain=CONTRIB_DOMAIN, num_heads=heads, **extra),
              helper.make_node("Reshape", [out, split], [split_out], name=f"{prefix}_out_r"),
              helper.make_node("Transpose", [split_out], [node.output[0]], name=f"{prefix}_out_t", perm=[0, 2, 1, 3])]
    return nodes
