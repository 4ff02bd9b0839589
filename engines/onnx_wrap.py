"""Graph surgery: give an NCHW float image model a uint8 NHWC input.

Frames cross the wire at one byte per channel; the conversion to the float NCHW
tensor the network was exported with happens inside the graph (DESIGN.md section 4).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

import numpy as np


def prepend_uint8_nhwc_preprocessing(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose image input is UINT8 [N,H,W,3] (RGB, 0..255).

    The source model must have exactly one graph input, float32 [N,3,H,W] in 0..1.
    The new input keeps the source input's name and N, H, W; in front of the original
    graph it runs Cast(float) -> Mul(1/255) -> Transpose(0,3,1,2). Outputs, metadata_props
    and everything else are kept as they are.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"expected one image input, found {[i.name for i in inputs]}")
    source = inputs[0]
    ttype = source.type.tensor_type
    if ttype.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {source.name!r} is not float32 "
                         f"({TensorProto.DataType.Name(ttype.elem_type)})")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in ttype.shape.dim]
    if len(dims) != 4 or dims[1] != 3:
        raise ValueError(f"input {source.name!r} is not [N,3,H,W]: {dims}")
    n, _, h, w = dims

    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    g = wrapped.graph

    taken = {init.name for init in g.initializer} | {i.name for i in g.input}
    taken |= {o.name for o in g.output} | {v.name for v in g.value_info}
    for node in g.node:
        taken.update(node.input)
        taken.update(node.output)
        taken.add(node.name)

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    image = source.name
    as_float = fresh(f"{image}_f32_nhwc")
    scaled = fresh(f"{image}_f32_nhwc_01")
    nchw = fresh(f"{image}_f32_nchw")
    scale = fresh(f"{image}_scale_1_255")

    _rename_uses(g, image, nchw)

    g.initializer.append(numpy_helper.from_array(np.array(1.0 / 255.0, dtype=np.float32), scale))
    pre = [
        helper.make_node("Cast", [image], [as_float], name=fresh("pre_cast"), to=TensorProto.FLOAT),
        helper.make_node("Mul", [as_float, scale], [scaled], name=fresh("pre_scale")),
        helper.make_node("Transpose", [scaled], [nchw], name=fresh("pre_nhwc_to_nchw"), perm=[0, 3, 1, 2]),
    ]
    nodes = pre + list(g.node)
    del g.node[:]
    g.node.extend(nodes)

    new_input = helper.make_tensor_value_info(image, TensorProto.UINT8, [n, h, w, 3])
    position = [i.name for i in g.input].index(image)
    g.input[position].CopyFrom(new_input)
    return wrapped


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every consumer of ``old`` (subgraphs included) at ``new``."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _rename_uses(sub, old, new)
