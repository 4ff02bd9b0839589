"""``sam2_memory_encoder`` STAND-IN contract model: no learned meaning, no SAM 2 weights.

Same tensors as the real memory encoder (the model contract (README.md, "The model contract")): a
batching model, one object per row (the per-object graph runs once per row, ONNX Scan);
``maskmem_feat`` is FLOAT16, as on the T4. What the 64 channels of the stand-in memory hold (4x4 space-to-depth blocks of
S/4 maps on the S/16 grid; channel map in engines/sam2_standin/_graph.py):

- channels 0..15: the mask, 20 * sigmoid(``mask_logits``) - 10 (SAM 2's scale and bias for
  the memory encoder) when ``object_score_logits`` > 0, else -10 everywhere (object absent);
- channels 16..63: the frame's RGB at S/4 (``vision_feat`` channels 3..50): what the object
  and its surroundings looked like, for the memory-attention stand-in to match.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from engines.sam2_standin._graph import (
    FEATURE_CHANNELS,
    MEMORY_CHANNELS,
    MEMORY_MASK_BIAS,
    MEMORY_MASK_SCALE,
    VISION_RGB_CHANNELS,
    GraphBuilder,
    check_image_size,
)

NAME = "sam2_memory_encoder"
MAX_BATCH_SIZE = 16  # objects per call: a session tracks at most 16


def build(image_size: int) -> onnx.ModelProto:
    s = check_image_size(image_size)
    f, grid = s // 16, s // 4
    g = GraphBuilder(NAME)

    # SAM 2 keeps the object in memory when its object score logit is > 0.
    present = g.Reshape(g.to_float(g.Greater("object_score_logits", g.const(0.0))), g.ints(1, 1, 1, 1))
    probability = g.Mul(g.Sigmoid("mask_logits"), present)  # [1,1,G,G]
    mask = g.Add(g.Mul(probability, g.const(MEMORY_MASK_SCALE)), g.const(MEMORY_MASK_BIAS))
    appearance = g.channels("vision_feat", *VISION_RGB_CHANNELS)  # [1,48,F,F]

    memory = g.Concat(g.from_mask_grid(mask), appearance, axis=1)
    g.Cast(memory, to=TensorProto.FLOAT16, name="maskmem_feat")

    # One object per row of the batch.
    return g.rows_model(
        inputs=[
            ("vision_feat", TensorProto.FLOAT, [FEATURE_CHANNELS, f, f]),
            ("mask_logits", TensorProto.FLOAT, [1, grid, grid]),
            ("object_score_logits", TensorProto.FLOAT, [1]),
        ],
        outputs=[("maskmem_feat", TensorProto.FLOAT16, [MEMORY_CHANNELS, f, f])],
        one_row={"vision_feat", "mask_logits", "object_score_logits", "maskmem_feat"},
        doc=__doc__,
        image_size=s,
    )
