"""Softmax over an inner axis, rewritten as a Softmax over the last axis between two Transposes.

ONNX Runtime computes ``Softmax(axis=a)`` with ``a`` not the last axis by transposing ``a`` to the
end, running its softmax kernel over the contiguous rows and transposing back, inside the Softmax
kernel. YOLOv8's box head (the distribution over 16 bins per box side: Softmax on axis 1 of
[1, 16, 4, 8400]) took 4.8 ms of a ~60 ms call that way. The same three steps as graph nodes,
Transpose -> Softmax(axis=-1) -> Transpose, run the same softmax kernel over the same rows, so the
numbers are the same (bit for bit on YOLOv8n: bench/README.md), in 0.7 ms: ONNX Runtime's
Transpose operator is faster than the kernel's own, and its transpose optimiser merges the first
Transpose with the one that made the tensor.

Opset 13 and later only: before it, Softmax flattened the tensor to 2-D at ``axis``, another
operation. A Softmax whose input rank shape inference cannot tell is left alone.
"""

from __future__ import annotations

import onnx
from onnx import helper

from engines.onnx_graph import editable_copy


def softmax_on_last_axis(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(a copy of ``model`` with every inner-axis Softmax of the default domain rewritten, how many
    were); ``model`` itself when there was none."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return model, 0
    ranks = _ranks(model)
    rewritten = editable_copy(model)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in rewritten.graph.node:
        rank = ranks.get(node.input[0]) if node.op_type == "Softmax" and node.domain in ("", "ai.onnx") else None
        axis = _axis(node) % rank if rank else None
        if rank is None or axis == rank - 1:
            nodes.append(node)
            continue
        forward = [d for d in range(rank) if d != axis] + [axis]
        backward = [forward.index(d) for d in range(rank)]
        name = node.name or node.output[0]
        moved, softened = f"{name}/last_axis_in", f"{name}/last_axis_out"
        nodes += [
            helper.make_node("Transpose", [node.input[0]], [moved], name=moved, perm=forward),
            helper.make_node("Softmax", [moved], [softened], name=f"{name}/last_axis", axis=-1),
            helper.make_node("Transpose", [softened], [node.output[0]], name=softened, perm=backward),
        ]
        count += 1
    if not count:
        return model, 0
    del rewritten.graph.node[:]
    rewritten.graph.node.extend(nodes)
    return rewritten, count


def _axis(node: onnx.NodeProto) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's rank that shape inference can tell, by name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {value.name: len(value.type.tensor_type.shape.dim)
            for value in (*graph.input, *graph.value_info, *graph.output)
            if value.type.tensor_type.HasField("shape")}
