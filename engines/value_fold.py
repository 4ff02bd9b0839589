"""Fold an attention's value projection behind its weighted sum: ``A (X W + b)`` becomes ``(A X) W + b``.

SAM 2's memory attention cross-attends 4096 image tokens to the memories: 7 x 4096 spatial tokens and
the object pointers' tokens, each only 64 wide (``kv_in_dim``), projected to 256 by ``v_proj`` before
the attention weights A (4096 x ~28,700, one head) are applied. The product A V then costs
4096 x keys x 256 multiply-adds. Since A's rows sum to 1 (a softmax over the keys), the same
result is ``(A X) W + b``: A applied to the 64-wide memories, then the projection to 256 on 4096
rows only. A V's multiply-adds drop by 256 / 64 = 4x: for the score products of Q K^T and A V
together, 37.5 % of a cross-attention's arithmetic, with the same result to float rounding. The
self-attention's values are 256 wide (no narrower input), so it is untouched; the key projection
cannot be folded the same way because rotary position encoding is applied after it.

``fold_value_projection`` finds ``Softmax -> MatMul(., V)`` where V is
``Transpose(Reshape(Add(MatMul(X, W), b)), [0, 2, 1, 3])`` (the exporter's BNSH split of the heads),
W and b initializers and W narrower on its input side than one head is wide (``d_in < d_out /
heads``), and rewrites the MatMul as ``Add(MatMul(MatMul(A, Unsqueeze(X, 1)), W), b)``. Only a
single head is rewritten (``num_heads`` 1): with several heads each would need its own slice of W.
Nodes left unused (the projection of the values, the shape arithmetic of their split) are removed.
The CPU repository builder checks the rewritten graph against the original on seeded inputs before
serving it (engines/cpu_repository.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from engines.onnx_graph import editable_copy, perm, wiring

_HEADS_FIRST = [0, 2, 1, 3]


def fold_value_projection(model: onnx.ModelProto, num_heads: int) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every foldable value projection folded, and how many were."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    folded = editable_copy(model)
    if num_heads != 1:
        return folded, 0
    graph = folded.graph
    producers, consumers = wiring(graph)
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    replacement: dict[int, list[onnx.NodeProto]] = {}  # id(the weighted-sum MatMul) -> its replacement
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        users = consumers.get(softmax.output[0], [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != softmax.output[0]:
            continue
        weighted = users[0]
        match = _value_projection(weighted.input[1], producers, weights)
        if match is None:
            continue
        narrow, weight, bias = match
        prefix = f"/folded_value_{len(replacement)}"
        axis = f"{prefix}/axis"
        replacement[id(weighted)] = [
            helper.make_node("Constant", [], [axis], value=numpy_helper.from_array(np.array([1], np.int64), axis)),
            # [B, keys, d_in] -> [B, 1, keys, d_in]: the one head's values before their projection
            helper.make_node("Unsqueeze", [narrow, axis], [f"{prefix}/values"]),
            helper.make_node("MatMul", [softmax.output[0], f"{prefix}/values"], [f"{prefix}/weighted_narrow"]),
            helper.make_node("MatMul", [f"{prefix}/weighted_narrow", weight], [f"{prefix}/weighted_wide"]),
            helper.make_node("Add", [f"{prefix}/weighted_wide", bias], [weighted.output[0]]),
        ]
    if not replacement:
        return folded, 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:  # the replacement where the MatMul was: the order stays topological
        nodes.extend(replacement.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_dead_nodes(graph)
    return folded, len(replacement)


def _value_projection(value: str, producers, weights) -> tuple[str, str, str] | None:
    """(X, W, b) when ``value`` is Transpose(Reshape(Add(MatMul(X, W), b)), [0, 2, 1, 3]) with W
    [d_in, d_out], b [d_out] initializers and d_in < d_out."""
    transpose = producers.get(value)
    if transpose is None or transpose.op_type != "Transpose" or perm(transpose) != _HEADS_FIRST:
        return None
    reshape = producers.get(transpose.input[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    add = producers.get(reshape.input[0])
    if add is None or add.op_type != "Add":
        return None
    for matmul_input, bias in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        matmul = producers.get(matmul_input)
        if matmul is None or matmul.op_type != "MatMul":
            continue
        w, b = _constant(matmul.input[1], producers, weights), _constant(bias, producers, weights)
        if w is not None and b is not None and w.ndim == 2 and b.shape == (w.shape[1],) and w.shape[0] < w.shape[1]:
            return matmul.input[0], matmul.input[1], bias
    return None


def _constant(name: str, producers, weights) -> np.ndarray | None:
    """The initializer ``name`` is, through Identity nodes (the exporter writes equal initializers,
    such as the zero biases of a seeded model, once and the others as Identity of it)."""
    while name not in weights:
        node = producers.get(name)
        if node is None or node.op_type != "Identity":
            return None
        name = node.input[0]
    return weights[name]


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Nodes none of whose outputs is used any more (repeatedly: a chain dies from its end)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        live = [n for n in graph.node if any(o in used for o in n.output)]
        if len(live) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(live)
