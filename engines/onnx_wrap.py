"""Graph surgery: give an NCHW float image model a uint8 NHWC input.

Frames cross the wire at one byte per channel; the conversion to the float NCHW
tensor the network was exported with happens inside the graph (the model contract (README.md, "The model contract")).
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


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def wrap_u2net_matting(
    model: onnx.ModelProto,
    *,
    image_name: str = "image",
    alpha_name: str = "alpha",
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> onnx.ModelProto:
    """Return U^2-Net (or U^2-Netp) behind the matting contract: ``image`` UINT8 [B,S,S,3] (RGB)
    -> ``alpha`` FP32 [B,1,S,S] in 0..1.

    The source model has one input, float32 [1 or N,3,S,S], and its first output is the fused
    saliency map [N,1,S,S] (after its sigmoid). Around it, per batch item, the graph does what the
    reference pre/post-processing (rembg's u2net sessions) does around the resize:

    - in: Cast(float) -> divide by the item's own maximum pixel value (rembg: ``im / np.max(im)``,
      not by 255; an all-black item divides by 1 instead of 0) -> (x - mean) / std -> NCHW;
    - out: channel 0 of the first output -> (x - min) / (max - min) over the item (a flat map,
      max - min below 1e-12, comes out 0 everywhere instead of NaN).

    The batch dimension becomes dynamic (the network is fully convolutional and computes every
    item on its own); the other outputs (side saliency maps) and the nodes only they need are
    dropped.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"expected one image input, found {[i.name for i in inputs]}")
    source = inputs[0]
    ttype = source.type.tensor_type
    if ttype.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {source.name!r} is not float32 ({TensorProto.DataType.Name(ttype.elem_type)})")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or not dims[2] or dims[2] != dims[3]:
        raise ValueError(f"input {source.name!r} is not [N,3,S,S] with a fixed S: {dims}")
    size = int(dims[2])
    if not graph.output:
        raise ValueError("the model has no output")
    saliency = graph.output[0].name

    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    g = wrapped.graph
    del g.value_info[:]  # shapes recorded for batch 1 would contradict the dynamic batch

    taken = {init.name for init in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    for node in g.node:
        taken.update(node.input)
        taken.update(node.output)
        taken.add(node.name)
    if image_name in taken or alpha_name in taken:
        raise ValueError(f"the model already has a tensor named {image_name!r} or {alpha_name!r}")
    taken |= {image_name, alpha_name}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    def constant(base: str, value) -> str:
        name = fresh(base)
        g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    nchw = fresh("pre_nchw")
    _rename_uses(g, source.name, nchw)
    as_float, item_max, divisor, scaled = fresh("pre_f32"), fresh("pre_max"), fresh("pre_divisor"), fresh("pre_01")
    centred, normalised = fresh("pre_centred"), fresh("pre_normalised")
    one = constant("pre_one", np.float32(1.0))
    mean_c = constant("pre_mean", np.array(mean, np.float32).reshape(1, 1, 1, 3))
    std_c = constant("pre_std", np.array(std, np.float32).reshape(1, 1, 1, 3))
    pre = [
        helper.make_node("Cast", [image_name], [as_float], name=fresh("pre_cast"), to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", [as_float], [item_max], name=fresh("pre_item_max"), axes=[1, 2, 3], keepdims=1),
        helper.make_node("Max", [item_max, one], [divisor], name=fresh("pre_guard_black")),
        helper.make_node("Div", [as_float, divisor], [scaled], name=fresh("pre_divide_by_max")),
        helper.make_node("Sub", [scaled, mean_c], [centred], name=fresh("pre_sub_mean")),
        helper.make_node("Div", [centred, std_c], [normalised], name=fresh("pre_div_std")),
        helper.make_node("Transpose", [normalised], [nchw], name=fresh("pre_nhwc_to_nchw"), perm=[0, 3, 1, 2]),
    ]

    channel0, low, high, shifted, span, denominator = (fresh(n) for n in (
        "post_channel0", "post_min", "post_max", "post_shifted", "post_span", "post_denominator"))
    post = [
        helper.make_node("Slice", [saliency, constant("post_start", np.array([0], np.int64)),
                                   constant("post_end", np.array([1], np.int64)),
                                   constant("post_axis", np.array([1], np.int64))],
                         [channel0], name=fresh("post_slice_channel0")),
        helper.make_node("ReduceMin", [channel0], [low], name=fresh("post_item_min"), axes=[1, 2, 3], keepdims=1),
        helper.make_node("ReduceMax", [channel0], [high], name=fresh("post_item_max"), axes=[1, 2, 3], keepdims=1),
        helper.make_node("Sub", [channel0, low], [shifted], name=fresh("post_shift")),
        helper.make_node("Sub", [high, low], [span], name=fresh("post_span")),
        helper.make_node("Max", [span, constant("post_min_span", np.float32(1e-12))], [denominator],
                         name=fresh("post_guard_flat")),
        helper.make_node("Div", [shifted, denominator], [alpha_name], name=fresh("post_min_max")),
    ]
    nodes = pre + list(g.node) + post
    del g.node[:]
    g.node.extend(_needed_nodes(nodes, alpha_name))
    used = {name for node in g.node for name in node.input}
    kept = [init for init in g.initializer if init.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)

    del g.input[:]
    g.input.append(helper.make_tensor_value_info(image_name, TensorProto.UINT8, ["batch", size, size, 3]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(alpha_name, TensorProto.FLOAT, ["batch", 1, size, size]))
    return wrapped


def _needed_nodes(nodes: list[onnx.NodeProto], output: str) -> list[onnx.NodeProto]:
    """The nodes ``output`` depends on, in their (topological) order."""
    needed, keep = {output}, []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
            for attr in node.attribute:  # a subgraph's outer-scope reads count too
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(name for n in sub.node for name in n.input if name)
    return keep[::-1]
