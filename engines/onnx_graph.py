"""An ONNX graph's wiring, for the graph rewrites (attention_fusion.py, value_fold.py): which node
makes each tensor, which nodes use it, and a Transpose's permutation."""

from __future__ import annotations

import onnx
from onnx import helper


def wiring(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """(producer of each tensor, consumers of each tensor), by tensor name."""
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producers, consumers


def perm(node: onnx.NodeProto) -> list[int]:
    """A Transpose's ``perm`` attribute ([] when it has none)."""
    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), [])


def editable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy of ``model`` to rewrite, leaving the caller's untouched."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
