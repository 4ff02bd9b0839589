"""``birefnet`` STAND-IN contract model: no learned meaning, no BiRefNet weights.

Same tensors as the real BiRefNet export (DESIGN.md section 4) with the preprocessing inside
the graph, so frames cross the wire at one byte per channel:

- ``image`` UINT8 [B,S,S,3] RGB is scaled to 0..1, made NCHW and ImageNet-normalised, exactly
  what the real network's export does before its backbone;
- ``alpha`` FLOAT [B,1,S,S] in 0..1, the sigmoid of the logits (as BiRefNet's last output).

What the stand-in computes instead of the network, per image and on a G x G grid (G = 64,
S / G pixels per cell, average-pooled), all of it deterministic arithmetic without seeds:

1. the mean colour of the border band (the outer 2 cells: 1/32 of the side), taken as
   "the background colour";
2. each cell's colour distance to it, relative to the image's mean distance: cells that differ
   from the border more than average lean foreground;
3. plus a centre prior (subjects tend to sit in the middle of a portrait);
4. a 5x5 box blur, bilinear upsampling to S x S, sigmoid.

So the matte varies with the image and looks like a soft matte, which is enough to exercise
every code path (crop, resize, PNG, RGBA) end to end; it is not background removal.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from engines.sam2_standin._graph import IR_VERSION, OPSET, GraphBuilder

NAME = "birefnet"
INPUT = "image"
OUTPUT = "alpha"
MAX_BATCH_SIZE = 4  # a 1024 image is 3 MiB in and 4 MiB out; larger batches buy nothing on CPU
GRID = 64
BORDER_CELLS = 2
BLUR_CELLS = 5
# ImageNet statistics, as BiRefNet's preprocessing uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Logit = CONTRAST * (distance / mean distance - 1) + CENTRE_WEIGHT * prior + CENTRE_BIAS,
# prior 1 at the centre and 0 at the corners. Picked by eye on the shared images so that a
# typical photo gives a clearly two-sided matte; no other meaning.
CONTRAST = 3.0
CENTRE_WEIGHT = 3.0
CENTRE_BIAS = -1.5
EPS = 1e-6


def check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < GRID or image_size % GRID:
        raise ValueError(f"birefnet image size must be an integer multiple of {GRID}, >= {GRID}; got {image_size!r}")
    return image_size


def border_weight(grid: int = GRID, band: int = BORDER_CELLS) -> np.ndarray:
    """[1,1,G,G]: 1 on the outer ``band`` cells of every side, 0 inside."""
    weight = np.ones((grid, grid), np.float32)
    weight[band:-band, band:-band] = 0.0
    return weight[None, None]


def centre_prior(grid: int = GRID) -> np.ndarray:
    """[1,1,G,G]: 1 at the centre falling to 0 at the corners (1 - r^2 / 2, r in corner units)."""
    centres = (np.arange(grid, dtype=np.float32) + 0.5) / grid * 2.0 - 1.0  # -1..1
    r2 = centres[None, :] ** 2 + centres[:, None] ** 2
    return (1.0 - r2 / 2.0).astype(np.float32)[None, None]


def build(image_size: int) -> onnx.ModelProto:
    s = check_image_size(image_size)
    factor = s // GRID
    g = GraphBuilder(NAME)

    rgb = g.Transpose(g.Mul(g.to_float(INPUT), g.const(1.0 / 255.0)), perm=[0, 3, 1, 2])  # [B,3,S,S]
    mean = g.const(np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1))
    std = g.const(np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1))
    normalised = g.Div(g.Sub(rgb, mean), std)
    cells = g.AveragePool(normalised, kernel_shape=[factor, factor], strides=[factor, factor])  # [B,3,G,G]

    background = g.masked_mean_hw(cells, g.const(border_weight()))  # [B,3,1,1]
    diff = g.Sub(cells, background)
    distance = g.Sqrt(g.Add(g.ReduceSum(g.Mul(diff, diff), g.ints(1), keepdims=1), g.const(EPS)))  # [B,1,G,G]
    relative = g.Div(distance, g.Add(g.ReduceMean(distance, axes=[2, 3], keepdims=1), g.const(EPS)))
    logits = g.Add(
        g.Mul(g.Sub(relative, g.const(1.0)), g.const(CONTRAST)),
        g.Add(g.Mul(g.const(centre_prior()), g.const(CENTRE_WEIGHT)), g.const(CENTRE_BIAS)),
    )
    pad = BLUR_CELLS // 2
    smoothed = g.AveragePool(
        logits, kernel_shape=[BLUR_CELLS, BLUR_CELLS], strides=[1, 1], pads=[pad] * 4, count_include_pad=0
    )
    g.Sigmoid(g.resize(smoothed, float(factor)), name=OUTPUT)

    return _finish(g, s)


def _finish(g: GraphBuilder, s: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes,
        NAME,
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", s, s, 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1, s, s])],
        initializer=g.initializers,
        doc_string=__doc__,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="framewise engines/birefnet_standin",
        doc_string=__doc__,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"stand_in": "true", "framewise_model": NAME, "image_size": str(s)})
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model
