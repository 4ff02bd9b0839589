"""``sam2_mask_decoder`` STAND-IN contract model: no learned meaning, no SAM 2 weights.

Same tensors as the real prompt encoder + mask decoder + object-pointer head, returning ALL
candidates (the model contract (README.md, "The model contract")). Deterministic arithmetic (indicator tensors, no control flow):

1. A logit map L on the S/4 mask grid:
   - box (a label-2 / label-3 point pair): +10 inside, -10 outside, linear over one cell at
     the edges (so a box narrower than a cell still shows);
   - points: a Gaussian bump (sigma S/32 model pixels) of +12 per positive and -12 per
     negative point, on a -6 background when there is no box;
   - padding (-1) is ignored; with no prompt at all, L = the mask prior that the
     memory-attention stand-in writes into ``image_embed`` channels 240..255 (an S/4 map as
     4x4 space-to-depth blocks; -10, no object, straight from the image encoder).
2. Colour refinement where L is uncertain (weight exp(-L^2/8)): +/- up to 3 by whether the
   cell's colour (RGB channels of both high-res features, S/4) is nearer the mean colour under
   the mask or the mean colour of a ring around it. This lets a prior that is unsure where the
   object went (see the memory-attention stand-in) settle on the object's edges.
3. Candidates: 0 (single-mask output) = L smoothed (3x3 mean); multimask 1 = L, 2 = L
   dilated, 3 = L eroded (by max(1, S/512) cells). Candidate 1 is the best guess, so a tracker
   that keeps choosing it reproduces a mask exactly on a still frame.
4. ``iou_scores``: 0.02 + 0.96 * (soft IoU of the candidate with L) * (how decisive L is, mean
   |tanh(L/4)|) - 0.001 * index (no ties): in (0, 1), highest for candidate 1.
5. ``obj_ptrs``: tanh of a seeded projection of the mean of ``image_embed`` under each
   candidate; ``object_score_logits``: max(L) - 2, clipped to [-20, 20] (a box prompt gives
   8; an empty mask, e.g. no prompt on a frame without memory, < -1).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from engines.sam2_standin._graph import (
    FEATURE_CHANNELS,
    HIGH_RES_CHANNELS,
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_POSITIVE,
    NUM_CANDIDATES,
    PRIOR_CHANNELS,
    GraphBuilder,
    check_image_size,
    pixel_centres,
    rng,
)

NAME = "sam2_mask_decoder"
MAX_BATCH_SIZE = 16

BOX_LOGIT = 10.0
POINT_LOGIT = 12.0
POINTS_BACKGROUND = -6.0
COLOUR_TAU = 0.1  # colour distance (RGB in 0..1) that counts as "different"
COLOUR_LIMIT = 3.0
UNCERTAIN_SCALE = 2.0  # refinement weight exp(-L^2 / (2 * 2^2))
OBJECT_SCORE_OFFSET = 2.0


def build(image_size: int) -> onnx.ModelProto:
    s = check_image_size(image_size)
    f, grid = s // 16, s // 4
    stride = 4  # model pixels per mask cell
    sigma = s / 32.0
    radius = max(1, grid // 128)
    rs = rng(NAME)
    g = GraphBuilder(NAME)

    # --- prompts -> indicator tensors [B,P] --------------------------------------------------
    def is_label(label: int) -> str:
        return g.to_float(g.Equal("point_labels", g.const(label, np.int32)))

    pos, neg = is_label(LABEL_POSITIVE), is_label(LABEL_NEGATIVE)
    tl, br = is_label(LABEL_BOX_TOP_LEFT), is_label(LABEL_BOX_BOTTOM_RIGHT)
    x = g.Gather("point_coords", g.const(0, np.int64), axis=2)  # [B,P]
    y = g.Gather("point_coords", g.const(1, np.int64), axis=2)
    one = g.const(1.0)

    def count(indicator: str) -> str:  # [B,P] -> [B,1]
        return g.ReduceSum(indicator, g.ints(1), keepdims=1)

    def present(indicator: str) -> str:  # 1.0 when any point has the label, else 0.0
        return g.Min(count(indicator), one)

    def mean_of(values: str, indicator: str) -> str:  # [B,1]
        return g.Div(g.ReduceSum(g.Mul(values, indicator), g.ints(1), keepdims=1), g.Max(count(indicator), one))

    def as_map(v: str) -> str:  # [B,1] -> [B,1,1,1]
        return g.Unsqueeze(v, g.ints(2, 3))

    # --- box: coverage of each cell by the box, as a +/-10 logit ------------------------------
    has_box = g.Mul(present(tl), present(br))  # [B,1]
    x_a, x_b, y_a, y_b = mean_of(x, tl), mean_of(x, br), mean_of(y, tl), mean_of(y, br)
    x_lo, x_hi = as_map(g.Min(x_a, x_b)), as_map(g.Max(x_a, x_b))
    y_lo, y_hi = as_map(g.Min(y_a, y_b)), as_map(g.Max(y_a, y_b))
    xs = g.const(pixel_centres(grid, stride).reshape(1, 1, 1, grid))
    ys = g.const(pixel_centres(grid, stride).reshape(1, 1, grid, 1))

    def ramp(lo: str, hi: str, centres: str) -> str:  # 1 inside, 0 outside, linear over one cell
        inside = g.Min(g.Sub(centres, lo), g.Sub(hi, centres))
        return g.Clip(g.Add(g.Mul(inside, g.const(1.0 / stride)), g.const(0.5)), g.const(0.0), one)

    coverage = g.Mul(ramp(x_lo, x_hi, xs), ramp(y_lo, y_hi, ys))  # [B,1,G,G]
    box_logit = g.Sub(g.Mul(coverage, g.const(2 * BOX_LOGIT)), g.const(BOX_LOGIT))

    # --- points: separable Gaussians, summed with one MatMul ----------------------------------
    def gaussian(coord: str) -> str:  # [B,P] -> [B,P,G]
        d = g.Sub(g.Unsqueeze(coord, g.ints(2)), g.const(pixel_centres(grid, stride).reshape(1, 1, grid)))
        return g.Exp(g.Mul(g.Mul(d, d), g.const(-0.5 / sigma**2)))

    signed = g.Mul(g.Sub(pos, neg), g.const(POINT_LOGIT))  # [B,P]
    gy = g.Mul(gaussian(y), g.Unsqueeze(signed, g.ints(2)))  # [B,P,G]
    bumps = g.Unsqueeze(g.MatMul(g.Transpose(gy, perm=[0, 2, 1]), gaussian(x)), g.ints(1))  # [B,1,G,G]
    has_points = present(g.Add(pos, neg))

    no_box = g.Sub(one, has_box)
    points_floor = as_map(g.Mul(g.Mul(no_box, has_points), g.const(POINTS_BACKGROUND)))
    prompt_logit = g.Add(g.Add(g.Mul(box_logit, as_map(has_box)), points_floor), bumps)
    has_prompt = as_map(g.Max(has_box, has_points))

    # --- no prompt: the mask prior carried in image_embed ---------------------------------------
    prior = g.to_mask_grid(g.channels("image_embed", *PRIOR_CHANNELS))  # [B,1,G,G]
    raw = g.Add(g.Mul(prompt_logit, has_prompt), g.Mul(prior, g.Sub(one, has_prompt)))

    # --- colour refinement where the logit is uncertain ----------------------------------------
    rgb = g.Mul(
        g.Add(g.channels("high_res_feat0", 0, 3), g.resize(g.channels("high_res_feat1", 0, 3), 2.0)), g.const(0.5)
    )  # [B,3,G,G]
    inside = g.Sigmoid(g.Mul(raw, g.const(4.0)))  # sharp weights: the background must not leak in
    ring = 4 * radius + 1  # the background is what surrounds the mask
    around = g.Sub(g.MaxPool(inside, kernel_shape=[ring, ring], pads=[2 * radius] * 4), inside)

    def colour_distance(weight: str) -> str:  # squared distance to the weighted mean colour
        diff = g.Sub(rgb, g.masked_mean_hw(rgb, weight))
        return g.ReduceSum(g.Mul(diff, diff), g.ints(1), keepdims=1)

    contrast = g.Mul(g.Sub(colour_distance(around), colour_distance(inside)), g.const(0.5 / COLOUR_TAU**2))
    contrast = g.Clip(contrast, g.const(-COLOUR_LIMIT), g.const(COLOUR_LIMIT))
    uncertain = g.Exp(g.Mul(g.Mul(raw, raw), g.const(-0.5 / UNCERTAIN_SCALE**2)))
    logit = g.Add(raw, g.Mul(uncertain, contrast))  # L, [B,1,G,G]

    # --- candidates --------------------------------------------------------------------------
    smoothed = g.AveragePool(logit, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0)
    k = 2 * radius + 1
    grown = g.MaxPool(logit, kernel_shape=[k, k], pads=[radius] * 4)
    shrunk = g.Neg(g.MaxPool(g.Neg(logit), kernel_shape=[k, k], pads=[radius] * 4))
    g.Concat(smoothed, logit, grown, shrunk, axis=1, name="masks")  # [B,4,G,G]

    # --- predicted IoU -----------------------------------------------------------------------
    probs = g.Sigmoid("masks")
    p0 = g.Sigmoid(logit)
    soft_iou = g.Div(g.Add(g.sum_hw(g.Min(probs, p0)), one), g.Add(g.sum_hw(g.Max(probs, p0)), one))  # [B,4,1,1]
    decisive = g.ReduceMean(g.Abs(g.Tanh(g.Mul(logit, g.const(0.25)))), axes=[1, 2, 3], keepdims=1)
    iou = g.Add(
        g.Mul(g.Mul(soft_iou, decisive), g.const(0.96)),
        g.const((0.02 - 0.001 * np.arange(NUM_CANDIDATES, dtype=np.float32)).reshape(1, -1, 1, 1)),
    )
    g.Reshape(iou, g.ints(-1, NUM_CANDIDATES), name="iou_scores")

    # --- object pointers: projected mean of image_embed under each candidate -----------------
    weight = g.Reshape(g.AveragePool(probs, kernel_shape=[4, 4], strides=[4, 4]), g.ints(0, NUM_CANDIDATES, -1))
    embed = g.Transpose(g.Reshape("image_embed", g.ints(0, FEATURE_CHANNELS, -1)), perm=[0, 2, 1])  # [B,F*F,256]
    pooled = g.Div(g.MatMul(weight, embed), g.Add(g.ReduceSum(weight, g.ints(2), keepdims=1), g.const(1e-6)))
    w_ptr = rs.normal(0.0, 1.0 / np.sqrt(FEATURE_CHANNELS), (FEATURE_CHANNELS, FEATURE_CHANNELS)).astype(np.float32)
    b_ptr = rs.normal(0.0, 0.1, FEATURE_CHANNELS).astype(np.float32)
    g.Tanh(g.Add(g.MatMul(pooled, g.const(w_ptr)), g.const(b_ptr)), name="obj_ptrs")

    # --- object score: the strongest mask evidence -------------------------------------------
    strongest = g.ReduceMax(logit, axes=[2, 3], keepdims=0)  # [B,1]
    g.Clip(g.Sub(strongest, g.const(OBJECT_SCORE_OFFSET)), g.const(-20.0), g.const(20.0), name="object_score_logits")

    return g.model(
        inputs=[
            ("image_embed", TensorProto.FLOAT, ["batch", FEATURE_CHANNELS, f, f]),
            ("high_res_feat0", TensorProto.FLOAT, ["batch", HIGH_RES_CHANNELS[0], grid, grid]),
            ("high_res_feat1", TensorProto.FLOAT, ["batch", HIGH_RES_CHANNELS[1], s // 8, s // 8]),
            ("point_coords", TensorProto.FLOAT, ["batch", "points", 2]),
            ("point_labels", TensorProto.INT32, ["batch", "points"]),
        ],
        outputs=[
            ("masks", TensorProto.FLOAT, ["batch", NUM_CANDIDATES, grid, grid]),
            ("iou_scores", TensorProto.FLOAT, ["batch", NUM_CANDIDATES]),
            ("obj_ptrs", TensorProto.FLOAT, ["batch", NUM_CANDIDATES, FEATURE_CHANNELS]),
            ("object_score_logits", TensorProto.FLOAT, ["batch", 1]),
        ],
        doc=__doc__,
        image_size=s,
    )
