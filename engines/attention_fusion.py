"""Fuse the attention the PyTorch exporter spells out into ONNX Runtime's MultiHeadAttention.

torch.onnx exports ``F.scaled_dot_product_attention`` as its arithmetic:
``Softmax(MatMul(Q, Transpose(K, [0, 1, 3, 2])) * scale) @ V`` on [batch, heads, tokens, head_dim]
(BNSH) tensors. ONNX Runtime runs that as written and materialises the whole score matrix: in SAM
2's memory attention the cross-attention of 4096 image tokens over 7 memories (7 x 4096 tokens)
and 16 object pointers is a 4096 x 28,736 float matrix, 470 MB, written by the MatMul, read and
written by the Mul and the Softmax, read by the second MatMul, and the softmax output is a second
one. The com.microsoft ``MultiHeadAttention`` contrib op computes the same thing in tiles without
that matrix (its CPU kernel), for the same result to float rounding.

``fuse_attention`` finds the pattern and replaces it with: the query BNSH -> BSNH -> [B, S, N*H],
MultiHeadAttention(query, key BNSH, value BNSH, num_heads, scale), and the output back to BNSH
for whatever consumed the second MatMul. With one head, key and value go in as [B, keys, width]
(the head axis squeezed): in that layout MultiHeadAttention takes a value narrower than the key,
which a value projection folded behind the attention gives (engines/value_fold.py). Both Reshapes copy B and S from their input (shape
entries 0), so the batch stays dynamic: the batching memory attention (one row per tracked object)
is fused at any B, each row attending only to its own keys, as in the unfused graph. The key and
value must have the query's B (MultiHeadAttention does not broadcast a batch of 1 as MatMul does);
the memory attention export gives every row its own keys, so they do. ``num_heads`` must be
given (the export leaves the head count dynamic); the CPU repository builder checks the fused
graph against the original on real inputs before serving it (engines/cpu_repository.py), so a
wrong count cannot pass silently.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.onnx_graph import editable_copy, perm, wiring

MS_DOMAIN = "com.microsoft"
_KEY_TRANSPOSE = [0, 1, 3, 2]


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every matching attention fused, and how many were."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    fused_model = editable_copy(model)
    graph = fused_model.graph
    producers, consumers = wiring(graph)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    removed: set[int] = set()
    replacement: dict[int, list[onnx.NodeProto]] = {}  # id(second MatMul) -> the nodes in its place
    count = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        match = _match(softmax, producers, consumers, constants, {o.name for o in graph.output})
        if match is None:
            continue
        scores, scale_mul, key_t, weighted, query, key, value, scale = match
        prefix = f"/fused_attention_{count}"
        replacement[id(weighted)] = _fused_nodes(prefix, query, key, value, weighted.output[0], num_heads, scale)
        removed |= {id(scores), id(scale_mul), id(softmax), id(weighted)}
        if len(consumers.get(key_t.output[0], [])) == 1:
            removed.add(id(key_t))
        count += 1
    if count == 0:
        return fused_model, 0

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:  # the fused nodes where the second MatMul was: the order stays topological
        nodes.extend(replacement.get(id(node), []))
        if id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_constants(graph)
    if not any(o.domain == MS_DOMAIN for o in fused_model.opset_import):
        fused_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused_model, count


def _match(softmax, producers, consumers, constants, graph_outputs):
    """Softmax(Mul(MatMul(Q, Transpose(K, 0,1,3,2)), scalar)) feeding exactly one MatMul(., V)."""
    if _axis(softmax) not in (-1, 3):
        return None
    scale_mul = producers.get(softmax.input[0])
    if scale_mul is None or scale_mul.op_type != "Mul":
        return None
    scores, scale = producers.get(scale_mul.input[0]), constants.get(scale_mul.input[1])
    if scores is None or scores.op_type != "MatMul" or scale is None or scale.size != 1:
        return None
    key_t = producers.get(scores.input[1])
    if key_t is None or key_t.op_type != "Transpose" or perm(key_t) != _KEY_TRANSPOSE:
        return None
    users = consumers.get(softmax.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
        return None
    # the intermediate results must feed nothing else, or removing them would break the graph
    if len(consumers.get(scores.output[0], [])) != 1 or len(consumers.get(scale_mul.output[0], [])) != 1 \
            or {scores.output[0], scale_mul.output[0], softmax.output[0]} & graph_outputs:
        return None
    return scores, scale_mul, key_t, users[0], scores.input[0], key_t.input[0], users[0].input[1], \
        float(scale.reshape(-1)[0])


def _fused_nodes(prefix: str, query: str, key: str, value: str, output: str, heads: int,
                 scale: float) -> list[onnx.NodeProto]:
    def const(name: str, values: list[int]) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [f"{prefix}/{name}"],
                                value=numpy_helper.from_array(np.array(values, np.int64), f"{prefix}/{name}"))

    key_value: list[onnx.NodeProto] = []
    if heads == 1:
        # One head: key and value go in as [B, keys, width] (BSH), where MultiHeadAttention lets the
        # value be narrower than the key (a value projection folded behind the attention,
        # engines/value_fold.py); as BNSH it wants both the same width.
        key_value = [const("head_axis", [1]),
                     helper.make_node("Squeeze", [key, f"{prefix}/head_axis"], [f"{prefix}/key"]),
                     helper.make_node("Squeeze", [value, f"{prefix}/head_axis"], [f"{prefix}/value"])]
        key, value = f"{prefix}/key", f"{prefix}/value"
    return [
        helper.make_node("Transpose", [query], [f"{prefix}/query_bsnh"], perm=[0, 2, 1, 3]),
        # 0 = "this dim as it is": B and S stay whatever the call brings; only N*H is merged
        const("bsd", [0, 0, -1]),
        helper.make_node("Reshape", [f"{prefix}/query_bsnh", f"{prefix}/bsd"], [f"{prefix}/query"]),
        *key_value,
        helper.make_node("MultiHeadAttention", [f"{prefix}/query", key, value], [f"{prefix}/attended"],
                         domain=MS_DOMAIN, num_heads=heads, scale=scale),
        const("bsnh", [0, 0, heads, -1]),
        helper.make_node("Reshape", [f"{prefix}/attended", f"{prefix}/bsnh"], [f"{prefix}/attended_bsnh"]),
        helper.make_node("Transpose", [f"{prefix}/attended_bsnh"], [output], perm=[0, 2, 1, 3]),
    ]


def _drop_unused_constants(graph: onnx.GraphProto) -> None:
    """Constant nodes whose only consumer was fused away (the scales)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(keep)


def _axis(node: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
