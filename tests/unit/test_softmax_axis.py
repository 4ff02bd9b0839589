"""engines/softmax_axis.py: an inner-axis Softmax rewritten as Transpose -> Softmax(-1) ->
Transpose, with the same numbers; what is left alone. On the served YOLOv8:
tests/unit/test_cpu_repository.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.softmax_axis import softmax_on_last_axis


def _model(axis: int | None, *, opset: int = 17, shape: list | None = None) -> onnx.ModelProto:
    """x -> Relu -> Softmax(axis) -> y over [2, 16, 4, 7] (the rank unknown when ``shape`` is [])."""
    dims = [2, 16, 4, 7] if shape is None else shape
    softmax = helper.make_node("Softmax", ["r"], ["y"], name="head/Softmax", **({} if axis is None else {"axis": axis}))
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), softmax], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims or None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims or None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("axis", [0, 1, 2, -3])
def test_an_inner_axis_softmax_gives_the_same_numbers_over_the_last_axis(axis: int) -> None:
    model = _model(axis)
    rewritten, count = softmax_on_last_axis(model)
    assert count == 1
    assert [n.op_type for n in rewritten.graph.node] == ["Relu", "Transpose", "Softmax", "Transpose"]
    onnx.checker.check_model(rewritten, full_check=True)
    x = np.random.default_rng(axis + 5).standard_normal((2, 16, 4, 7)).astype(np.float32) * 4
    np.testing.assert_array_equal(_run(rewritten, x), _run(model, x))
    assert [n.op_type for n in model.graph.node] == ["Relu", "Softmax"]  # the caller's model is untouched


@pytest.mark.parametrize("model", [_model(-1), _model(3), _model(None), _model(1, opset=11), _model(1, shape=[])],
                         ids=["last axis", "last axis by number", "default axis", "opset 11 flattens", "rank unknown"])
def test_what_is_left_alone(model: onnx.ModelProto) -> None:
    rewritten, count = softmax_on_last_axis(model)
    assert count == 0 and rewritten is model
