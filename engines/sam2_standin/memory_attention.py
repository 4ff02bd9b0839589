"""``sam2_memory_attention`` STAND-IN contract model: no learned meaning, no SAM 2 weights.

Same tensors as the real memory attention (the model contract (README.md, "The model contract")):
a batching model, one tracked object per row; the per-object graph below runs once per row (ONNX
Scan). For one object, ``conditioned_feat`` is
``vision_feat`` with channels 240..255 replaced by a mask prior, a logit map on the S/4 mask
grid (4x4 space-to-depth blocks), which the mask-decoder stand-in uses when it has no prompt.
The "attention" is template matching over small displacements:

1. memory weights w = softmax(-t), t = ``memory_tpos``, the row of SAM 2's temporal encoding
   table each memory gets (num_maskmem - 1 - t_pos): 0 for the newest memory, larger for older
   ones, 6 for prompt frames; the newest memory weighs most;
2. template: mask T = sum_n w_n * p_n (p = memory mask probability) and its colours
   sum_n w_n p_n rgb_n / T, from the memories' S/4 mask and RGB channels;
3. for every displacement d in a (2R+1)^2 window, R = 2 * max(1, S/512) mask cells: the
   mean squared colour difference e(d) between the template and the current frame's S/4 RGB
   (``vision_feat`` channels 3..50) displaced by d, over the template's core (T eroded by one
   cell, so static background at its rim does not pin the match to "no motion");
   a = softmax(-(8 e(d) / (mean_d e + 0.02^2) + 0.25 |d|^2)) over d: sharp whatever the
   contrast, with a small preference for staying put;
4. prior = 20 * (sum_d a_d T(x - d) - 0.5) + 0.001 * tanh(pointer term): +10 where the
   template lands, -10 elsewhere, in between where the displacement is uncertain.
The pointer term, a seeded projection of the ``obj_ptrs`` mean weighted by
softmax(-|``obj_ptr_tdiff``| / 2), only makes every input count. Memories without the object
(mask -10 everywhere) give prior -10 everywhere.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from engines.sam2_standin._graph import (
    FEATURE_CHANNELS,
    MEMORY_CHANNELS,
    MEMORY_MASK_BIAS,
    MEMORY_MASK_CHANNELS,
    MEMORY_MASK_SCALE,
    MEMORY_RGB_CHANNELS,
    PRIOR_CHANNELS,
    VISION_RGB_CHANNELS,
    GraphBuilder,
    check_image_size,
    rng,
)

NAME = "sam2_memory_attention"
MAX_BATCH_SIZE = 16  # objects per call: a session tracks at most 16
MAX_MEMORIES = 7
MAX_POINTERS = 16

RECENCY = 1.0  # memory weights softmax(-RECENCY * memory_tpos)
CORE_MARGIN = 1  # cells
MATCH_SHARPNESS = 8.0  # cost of a displacement whose error is the window's mean error
MATCH_FLOOR = 0.02  # RGB (0..1) difference below which colours count as the same
STAY_PENALTY = 0.25  # per squared cell of displacement
PRIOR_GAIN = 20.0  # prior = 20 * (p - 0.5): the same +/-10 range as a box prompt and a memory
POINTER_GAIN = 1e-3


def build(image_size: int) -> onnx.ModelProto:
    s = check_image_size(image_size)
    f, grid = s // 16, s // 4
    reach = 2 * max(1, grid // 128)
    rs = rng(NAME)
    g = GraphBuilder(NAME)
    one, half = g.const(1.0), g.const(0.5)

    # --- 1. memory weights by recency --------------------------------------------------------
    age = g.to_float("memory_tpos")  # [N]
    weight = g.Reshape(g.Softmax(g.Mul(age, g.const(-RECENCY)), axis=0), g.ints(-1, 1, 1, 1))  # [N,1,1,1]

    # --- 2. the template: where the object was and what it looked like ------------------------
    memories = g.to_float("memory_feats")
    mask = g.to_mask_grid(g.channels(memories, *MEMORY_MASK_CHANNELS))  # [N,1,G,G]
    probability = g.Clip(g.Div(g.Sub(mask, g.const(MEMORY_MASK_BIAS)), g.const(MEMORY_MASK_SCALE)), g.const(0.0), one)
    rgb_then = g.to_mask_grid(g.channels(memories, *MEMORY_RGB_CHANNELS))  # [N,3,G,G]
    weighted = g.Mul(probability, weight)
    template = g.ReduceSum(weighted, g.ints(0), keepdims=1)  # T, [1,1,G,G]
    template_rgb = g.Div(
        g.ReduceSum(g.Mul(rgb_then, weighted), g.ints(0), keepdims=1), g.Add(template, g.const(1e-6))
    )  # [1,3,G,G]
    # Match on the template's core only: its rim is where background creeps in, and background
    # that stands still would pin the match to "no motion".
    k = 2 * CORE_MARGIN + 1
    core = g.Neg(g.MaxPool(g.Neg(template), kernel_shape=[k, k], pads=[CORE_MARGIN] * 4))
    core_mass = g.Add(g.ReduceSum(core, g.ints(0, 1, 2, 3), keepdims=0), g.const(1e-6))

    # --- 3. match the template against the current frame over displacements -----------------
    # error(d) = sum_x core(x) |now(x + d) - tmpl(x)|^2 / sum core
    #          = (sum core |now(x+d)|^2 - 2 sum core tmpl . now(x+d) + sum core |tmpl|^2) / sum core,
    # each sum over x for all d at once: a Conv of the padded frame with a G x G kernel.
    rgb_now = g.to_mask_grid(g.channels("vision_feat", *VISION_RGB_CHANNELS))  # [1,3,G,G]
    pads = g.ints(0, 0, reach, reach, 0, 0, reach, reach)
    now_padded = g.Pad(rgb_now, pads, mode="edge")  # [1,3,G+2R,G+2R]
    now_energy = g.ReduceSum(g.Mul(now_padded, now_padded), g.ints(1), keepdims=1)
    cross = g.Conv(now_padded, g.Mul(template_rgb, core))  # [1,1,2R+1,2R+1]
    energy = g.Conv(now_energy, core)
    template_energy = g.sum_hw(g.ReduceSum(g.Mul(g.Mul(template_rgb, template_rgb), core), g.ints(1), keepdims=1))
    errors = g.Div(g.Add(g.Sub(energy, g.Mul(cross, g.const(2.0))), template_energy), core_mass)
    errors = g.Relu(g.Reshape(errors, g.ints(1, -1)))  # [1,D], rounding >= 0
    # Relative to the mean error over the window, so the match is as sharp for a low-contrast
    # object as for a high-contrast one; MATCH_FLOOR keeps flat colour from looking like motion.
    scale = g.Add(g.ReduceMean(errors, axes=[1], keepdims=1), g.const(3 * MATCH_FLOOR**2))
    offsets = np.arange(-reach, reach + 1, dtype=np.float32)
    stay = (STAY_PENALTY * (offsets[:, None] ** 2 + offsets[None, :] ** 2)).reshape(1, -1)
    costs = g.Add(g.Mul(g.Div(errors, scale), g.const(MATCH_SHARPNESS)), g.const(stay))
    attention = g.Softmax(g.Neg(costs), axis=1)  # [1,D], d = (dy, dx)
    # location(x) = sum_d a_d T(x - d): a Conv of the padded template with the flipped weights.
    kernel = g.Reshape(
        g.Slice(attention, g.ints(-1), g.ints(-(2**62)), g.ints(1), g.ints(-1)),
        g.ints(1, 1, 2 * reach + 1, 2 * reach + 1),
    )
    location = g.Conv(g.Pad(template, pads, mode="constant"), kernel)  # [1,1,G,G]

    # --- a tiny term from the object pointers ---------------------------------------------------
    pointer_weight = g.Softmax(g.Mul(g.Abs(g.to_float("obj_ptr_tdiff")), g.const(-0.5)), axis=0)  # [M]
    pointer = g.MatMul(g.Unsqueeze(pointer_weight, g.ints(0)), "obj_ptrs")  # [1,256]
    u = rs.normal(0.0, 1.0 / np.sqrt(FEATURE_CHANNELS), (FEATURE_CHANNELS, 1)).astype(np.float32)
    pointer_term = g.Reshape(g.Mul(g.Tanh(g.MatMul(pointer, g.const(u))), g.const(POINTER_GAIN)), g.ints(1, 1, 1, 1))

    # --- 4. the prior ---------------------------------------------------------------------------
    prior = g.Add(g.Mul(g.Sub(location, half), g.const(PRIOR_GAIN)), pointer_term)
    g.Concat(g.channels("vision_feat", 0, PRIOR_CHANNELS[0]), g.from_mask_grid(prior), axis=1, name="conditioned_feat")

    # One object per row of the batch (the contract: row b is object b, with its own memories
    # and pointers; the rows of one request share N and M).
    return g.rows_model(
        inputs=[
            ("vision_feat", TensorProto.FLOAT, [FEATURE_CHANNELS, f, f]),
            ("memory_feats", TensorProto.FLOAT16, ["memories", MEMORY_CHANNELS, f, f]),
            ("memory_tpos", TensorProto.INT32, ["memories"]),
            ("obj_ptrs", TensorProto.FLOAT, ["pointers", FEATURE_CHANNELS]),
            ("obj_ptr_tdiff", TensorProto.INT32, ["pointers"]),
        ],
        outputs=[("conditioned_feat", TensorProto.FLOAT, [FEATURE_CHANNELS, f, f])],
        one_row={"vision_feat", "conditioned_feat"},
        doc=__doc__,
        image_size=s,
    )
