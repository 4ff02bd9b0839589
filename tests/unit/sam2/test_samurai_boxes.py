"""SAMURAI's box maths (server/sam2/samurai/boxes.py): boxes from mask logits, bilinear
upsampling as torch does it, IoU and the Kalman filter's box conversions; pure numpy,
hand-computed expectations.

Reference behaviour: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.sam2.samurai import (
    box_from_mask,
    box_from_mask_upsampled,
    box_iou,
    upsample_bilinear,
    xyah_to_xyxy,
    xyxy_to_xyah,
)
from server.sam2.samurai.boxes import bilinear_weights

EMPTY = [0.0, 0.0, 0.0, 0.0]


def rect_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Logits +8 on rows y0..y1 and columns x0..x1 (inclusive), -8 elsewhere."""
    m = np.full((h, w), -8.0, dtype=np.float32)
    m[y0 : y1 + 1, x0 : x1 + 1] = 8.0
    return m


def test_box_from_mask_empty_is_zeros_and_rectangle_is_inclusive_bounds():
    assert box_from_mask(np.full((32, 32), -3.0)).tolist() == EMPTY
    # A logit of exactly 0 is not foreground (the reference tests > 0.0).
    assert box_from_mask(np.zeros((32, 32))).tolist() == EMPTY
    # Rows 3..6, columns 10..14 -> [x_min, y_min, x_max, y_max] = [10, 3, 14, 6]: inclusive, no +1,
    # so the box is 4 wide and 3 high although it covers 5 x 4 pixels.
    m = rect_mask(32, 32, 3, 6, 10, 14)
    assert box_from_mask(m).tolist() == [10.0, 3.0, 14.0, 6.0]
    # A single pixel has zero width and height.
    assert box_from_mask(rect_mask(8, 8, 5, 5, 2, 2)).tolist() == [2.0, 5.0, 2.0, 5.0]


def test_bilinear_upsampling_matches_torch_align_corners_false_by_hand():
    # 2 -> 4 along x: src = (dst + 0.5) * 2 / 4 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (right
    # neighbour clamped), so [0, 4] -> [0, 0.25*4, 0.75*4, 4] = [0, 1, 3, 4].
    assert upsample_bilinear(np.array([[0.0, 4.0]]), (1, 4)).tolist() == [[0.0, 1.0, 3.0, 4.0]]
    # x4: the weight of input pixel 1 on outputs 0..15 (src = dst / 4 - 0.375):
    # d=2: src 0.125 -> 0.125; d=3: 0.375; d=4: 0.625; d=5: 0.875; d=6: src 1.125 -> 0.875; d=7: 0.625;
    # d=8: 0.375; d=9: 0.125; others 0.
    w = bilinear_weights(4, 16)[:, 1]
    assert w.tolist() == [0, 0, 0.125, 0.375, 0.625, 0.875, 0.875, 0.625, 0.375, 0.125, 0, 0, 0, 0, 0, 0]


def test_box_is_measured_after_upsampling_to_model_space():
    # 4x4 low-res logits: +3 at (1, 1), -1 elsewhere, upsampled to 16x16. The weights sum to 1, so
    # out = -1 + 4 * wy * wx, positive iff wy * wx > 0.25. The best column weight is 0.875, so rows
    # need wy > 0.25 / 0.875 = 0.286: wy in {0.375, 0.625, 0.875, 0.875, 0.625, 0.375} = rows 3..8;
    # columns likewise 3..8. Box [3, 3, 8, 8] (scaling the low-res box [1, 1, 1, 1] by 4 would give 4..7).
    m = -np.ones((4, 4), dtype=np.float32)
    m[1, 1] = 3.0
    assert box_from_mask_upsampled(m, (16, 16)).tolist() == [3.0, 3.0, 8.0, 8.0]
    assert box_from_mask(upsample_bilinear(m, (16, 16))).tolist() == [3.0, 3.0, 8.0, 8.0]
    # A positive pixel too weak to survive the interpolation: +0.1 at (1, 1) gives
    # out = -1 + 1.1 * wy * wx <= -1 + 1.1 * 0.875^2 = -0.16 everywhere -> empty.
    m[1, 1] = 0.1
    assert box_from_mask_upsampled(m, (16, 16)).tolist() == EMPTY
    assert box_from_mask_upsampled(np.full((4, 4), -1.0), (16, 16)).tolist() == EMPTY


def test_cropped_upsampled_box_equals_full_upsampling_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        logits = (rng.normal(size=(24, 20)) - 1.6).astype(np.float32)
        full = box_from_mask(upsample_bilinear(logits, (96, 80)))
        assert box_from_mask_upsampled(logits, (96, 80)).tolist() == full.tolist()


def test_iou_and_box_conversions_follow_the_reference():
    # [0,0,10,10] vs [5,5,15,15]: intersection 5*5 = 25, union 100 + 100 - 25 = 175 -> 1/7.
    assert box_iou(np.array([0, 0, 10, 10]), np.array([5, 5, 15, 15])) == pytest.approx(1 / 7)
    assert box_iou(np.array([0, 0, 10, 10]), np.array([20, 20, 30, 30])) == 0.0
    # The empty candidate box scores 0 even when the prediction covers the origin.
    assert box_iou(np.array([-5, -5, 5, 5]), np.zeros(4)) == 0.0
    # [10, 20, 50, 100]: centre (30, 60), w 40, h 80, a 0.5; and back.
    assert xyxy_to_xyah(np.array([10, 20, 50, 100])).tolist() == [30.0, 60.0, 0.5, 80.0]
    assert xyah_to_xyxy(np.array([30.0, 60.0, 0.5, 80.0])).tolist() == [10.0, 20.0, 50.0, 100.0]
    # Zero height counts as 1: the empty box becomes (0, 0, 0, 1).
    assert xyxy_to_xyah(np.zeros(4)).tolist() == [0.0, 0.0, 0.0, 1.0]
