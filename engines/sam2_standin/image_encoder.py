"""``sam2_image_encoder`` STAND-IN contract model: no learned meaning, no SAM 2 weights.

Same tensor names, ranks and dtypes as the real Hiera image encoder export
(the model contract (README.md, "The model contract")); the numbers are only cheap, deterministic image statistics:

- ``image`` UINT8 [B,S,S,3] RGB is scaled to 0..1 and made NCHW inside the graph;
- ``high_res_feat0`` [B,32,S/4,S/4]: 4x4 average-pooled RGB through a seeded 1x1 projection
  whose channels 0..2 are the pooled RGB itself;
- ``high_res_feat1`` [B,64,S/8,S/8]: the same from 8x8 pooling;
- ``vision_feat`` [B,256,S/16,S/16]: channels 0..2 the 16x16 pooled RGB, 3..50 the 4x4 pooled
  RGB as 4x4 space-to-depth blocks (what the memory-encoder stand-in remembers of a frame),
  51..239 a seeded projection of the pooled RGB, 240..255 the mask prior, -10 everywhere
  ("no memory, no object") until the memory-attention stand-in fills it. Channel map:
  engines/sam2_standin/_graph.py.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from engines.sam2_standin._graph import (
    FEATURE_CHANNELS,
    HIGH_RES_CHANNELS,
    NO_PRIOR_LOGIT,
    PRIOR_CHANNELS,
    VISION_RGB_CHANNELS,
    GraphBuilder,
    check_image_size,
    projection,
    rng,
)

NAME = "sam2_image_encoder"
MAX_BATCH_SIZE = 8


def build(image_size: int) -> onnx.ModelProto:
    s = check_image_size(image_size)
    rs = rng(NAME)
    g = GraphBuilder(NAME)

    rgb = g.Transpose(g.Mul(g.to_float("image"), g.const(1.0 / 255.0)), perm=[0, 3, 1, 2])  # [B,3,S,S]
    # Non-overlapping average pools nest exactly: pool 4, then 2 (= 8), then 2 again (= 16).
    pooled4 = g.AveragePool(rgb, kernel_shape=[4, 4], strides=[4, 4])
    pooled8 = g.AveragePool(pooled4, kernel_shape=[2, 2], strides=[2, 2])
    pooled16 = g.AveragePool(pooled8, kernel_shape=[2, 2], strides=[2, 2])

    def conv(x: str, out_channels: int, output: str | None = None) -> str:
        weight, bias = projection(rs, out_channels, 3, identity=3)
        return g.op("Conv", x, g.const(weight), g.const(bias), name=output)

    conv(pooled4, HIGH_RES_CHANNELS[0], "high_res_feat0")
    conv(pooled8, HIGH_RES_CHANNELS[1], "high_res_feat1")

    projected = conv(pooled16, PRIOR_CHANNELS[0])  # channels 0..2 = pooled16 itself
    no_prior = g.Add(
        g.Mul(g.channels(projected, 0, PRIOR_CHANNELS[1] - PRIOR_CHANNELS[0]), g.const(0.0)), g.const(NO_PRIOR_LOGIT)
    )
    g.Concat(
        g.channels(projected, 0, VISION_RGB_CHANNELS[0]),
        g.from_mask_grid(pooled4),
        g.channels(projected, VISION_RGB_CHANNELS[1], PRIOR_CHANNELS[0]),
        no_prior,
        axis=1,
        name="vision_feat",
    )

    f = s // 16
    return g.model(
        inputs=[("image", TensorProto.UINT8, ["batch", s, s, 3])],
        outputs=[
            ("vision_feat", TensorProto.FLOAT, ["batch", FEATURE_CHANNELS, f, f]),
            ("high_res_feat0", TensorProto.FLOAT, ["batch", HIGH_RES_CHANNELS[0], s // 4, s // 4]),
            ("high_res_feat1", TensorProto.FLOAT, ["batch", HIGH_RES_CHANNELS[1], s // 8, s // 8]),
        ],
        doc=__doc__,
        image_size=s,
    )
