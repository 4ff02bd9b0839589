"""engines/attention_fusion.py: the exporter's spelled-out attention fused into MultiHeadAttention,
same outputs under ONNX Runtime, and graphs that do not match left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.attention_fusion import fuse_attention


def attention_graph(heads: int, *, softmax_also_output: bool = False) -> onnx.ModelProto:
    """What torch.onnx writes for SDPA (BNSH), followed by an Add so the output has a consumer."""
    dims = ["batch", heads, "queries", 16], ["batch", heads, "keys", 16]
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(0.25, np.float32))),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["weights"], axis=-1),
        helper.make_node("MatMul", ["weights", "v"], ["attended"]),
        helper.make_node("Add", ["attended", "q"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, dims[0])]
    if softmax_also_output:
        outputs.append(helper.make_tensor_value_info("weights", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "sdpa", [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, dims[0]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, dims[1]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, dims[1]),
    ], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("heads", [1, 2])
def test_fused_graph_gives_the_same_output(heads):
    rng = np.random.default_rng(heads)
    feeds = {"q": rng.standard_normal((2, heads, 37, 16), dtype=np.float32),
             "k": rng.standard_normal((2, heads, 53, 16), dtype=np.float32),
             "v": rng.standard_normal((2, heads, 53, 16), dtype=np.float32)}
    original = attention_graph(heads)
    fused, count = fuse_attention(original, heads)
    assert count == 1
    ops = [n.op_type for n in fused.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops and "MatMul" not in ops
    assert any(o.domain == "com.microsoft" for o in fused.opset_import)
    (want,), (got,) = run(original, feeds), run(fused, feeds)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_wrong_head_count_changes_the_result():
    """Why the builder checks the fused graph numerically: the head count is not in the graph."""
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((1, 2, 20, 16), dtype=np.float32) for name in ("q", "k", "v")}
    original = attention_graph(2)
    fused, _ = fuse_attention(original, 1)
    (want,) = run(original, feeds)
    try:
        (got,) = run(fused, feeds)
    except Exception as exc:  # noqa: BLE001 - ORT refusing the shapes is a loud failure too
        assert "Incompatible dimensions" in str(exc) or "shape" in str(exc).lower()
        return
    assert got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_attention_whose_weights_are_used_elsewhere_is_left_alone():
    model = attention_graph(1, softmax_also_output=True)
    fused, count = fuse_attention(model, 1)
    assert count == 0
    assert [n.op_type for n in fused.graph.node] == [n.op_type for n in model.graph.node]


def test_bad_head_count_is_refused():
    with pytest.raises(ValueError, match="num_heads"):
        fuse_attention(attention_graph(1), 0)
