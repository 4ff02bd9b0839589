"""engines/value_fold.py: an attention's value projection folded behind the attention weights,
same outputs under ONNX Runtime (alone and then fused into MultiHeadAttention), and graphs that
do not fit left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.attention_fusion import fuse_attention
from engines.value_fold import fold_value_projection

WIDE = 32


def cross_attention_graph(*, narrow: int = 8, bias_through_identity: bool = False,
                          weights_also_output: bool = False) -> onnx.ModelProto:
    """What torch.onnx writes for a one-head cross-attention whose values are projected from
    ``narrow``-wide memories: v = x W + b split into BNSH, then Softmax(q k^T * scale) @ v."""
    rng = np.random.default_rng(7)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((narrow, WIDE)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(WIDE).astype(np.float32), "b0"),
        numpy_helper.from_array(np.array([0, 0, 1, -1], np.int64), "bnsh_split"),
    ]
    nodes = []
    bias = "b0"
    if bias_through_identity:  # the exporter writes equal initializers once, the others as Identity
        nodes.append(helper.make_node("Identity", ["b0"], ["b"]))
        bias = "b"
    nodes += [
        helper.make_node("MatMul", ["x", "w"], ["projected"]),
        helper.make_node("Add", [bias, "projected"], ["values"]),
        helper.make_node("Reshape", ["values", "bnsh_split"], ["values_bsnh"]),
        helper.make_node("Transpose", ["values_bsnh"], ["v"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(0.25, np.float32))),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["attended"]),
        helper.make_node("Add", ["attended", "q"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1, "queries", WIDE])]
    if weights_also_output:
        outputs.append(helper.make_tensor_value_info("weights", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "cross_attention", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", 1, "queries", WIDE]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", 1, "keys", WIDE]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "keys", narrow]),
    ], outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(narrow: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"q": rng.standard_normal((2, 1, 37, WIDE), dtype=np.float32),
            "k": rng.standard_normal((2, 1, 53, WIDE), dtype=np.float32),
            "x": rng.standard_normal((2, 53, narrow), dtype=np.float32)}


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["out"], inputs)[0]


@pytest.mark.parametrize("bias_through_identity", [False, True])
def test_folded_graph_gives_the_same_output(bias_through_identity):
    original = cross_attention_graph(bias_through_identity=bias_through_identity)
    folded, count = fold_value_projection(original, 1)
    assert count == 1
    np.testing.assert_allclose(run(folded, feeds()), run(original, feeds()), rtol=1e-5, atol=1e-5)
    # The weights are applied to the 8-wide memories, and the 32-wide values are no longer made.
    matmul_inputs = [list(n.input) for n in folded.graph.node if n.op_type == "MatMul"]
    assert ["x", "w"] not in matmul_inputs
    assert not any(n.op_type == "Reshape" for n in folded.graph.node)


def test_folded_then_fused_gives_the_same_output():
    """The CPU repository's ONNX Runtime path: MultiHeadAttention over a value narrower than its key."""
    original = cross_attention_graph()
    folded, _ = fold_value_projection(original, 1)
    fused, count = fuse_attention(folded, 1)
    assert count == 1 and "Softmax" not in [n.op_type for n in fused.graph.node]
    np.testing.assert_allclose(run(fused, feeds()), run(original, feeds()), rtol=1e-5, atol=1e-5)


def test_values_no_narrower_than_a_head_are_left_alone():
    original = cross_attention_graph(narrow=WIDE)
    folded, count = fold_value_projection(original, 1)
    assert count == 0
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in original.graph.node]


def test_attention_weights_used_elsewhere_still_come_out():
    """The fold only regroups the weighted sum: the weights themselves are made as before."""
    original = cross_attention_graph(weights_also_output=True)
    folded, count = fold_value_projection(original, 1)
    assert count == 1
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (original, folded)]
    (want_out, want_weights), (got_out, got_weights) = (s.run(["out", "weights"], feeds()) for s in sessions)
    np.testing.assert_array_equal(got_weights, want_weights)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-5)


def test_only_a_single_head_is_folded():
    original = cross_attention_graph()
    assert fold_value_projection(original, 2)[1] == 0
    with pytest.raises(ValueError, match="num_heads"):
        fold_value_projection(original, 0)
