"""SAMURAI tracking core (server/tracking): pure numpy, hand-computed expectations.

Reference behaviour: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py and
sam2/sam2/utils/kalman_filter.py (see the module docstrings in server/tracking/).
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from server.tracking import (
    CandidateSelector,
    KalmanFilter,
    MemoryBank,
    SamuraiConfig,
    box_from_mask,
    box_from_mask_upsampled,
    box_iou,
    upsample_bilinear,
    xyah_to_xyxy,
    xyxy_to_xyah,
)
from server.tracking.boxes import bilinear_weights

EMPTY = [0.0, 0.0, 0.0, 0.0]


def rect_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Logits +8 on rows y0..y1 and columns x0..x1 (inclusive), -8 elsewhere."""
    m = np.full((h, w), -8.0, dtype=np.float32)
    m[y0 : y1 + 1, x0 : x1 + 1] = 8.0
    return m


# ---- boxes ----------------------------------------------------------------------------------------


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


# ---- Kalman filter --------------------------------------------------------------------------------


def test_kalman_initiate_predict_update_closed_form():
    kf = KalmanFilter()
    # Box [10, 20, 50, 100] -> z = (30, 60, 0.5, 80); h = 80.
    mean, cov = kf.initiate(xyxy_to_xyah(np.array([10, 20, 50, 100])))
    assert mean.tolist() == [30, 60, 0.5, 80, 0, 0, 0, 0]
    # std0: position 2/20 * 80 = 8 -> 64; aspect 1e-2 -> 1e-4; velocity 10/160 * 80 = 5 -> 25; va 1e-5 -> 1e-10.
    assert np.allclose(np.diag(cov), [64, 64, 1e-4, 64, 25, 25, 1e-10, 25], rtol=0, atol=1e-15)
    assert np.count_nonzero(cov - np.diag(np.diag(cov))) == 0

    mean, cov = kf.predict(mean, cov)
    # Zero velocity: same position. P' = F P F^T + Q with Q from h = 80:
    # Q: (80/20)^2 = 16 for x, y, h; (1e-2)^2 = 1e-4 for a; (80/160)^2 = 0.25 for vx, vy, vh; 1e-10 for va.
    # P'_xx = P_xx + 2 P_xv + P_vv + Q_x = 64 + 0 + 25 + 16 = 105;  P'_x,vx = P_xv + P_vv = 25;
    # P'_vv = 25 + 0.25 = 25.25;  P'_aa = 1e-4 + 1e-10 + 1e-4;  P'_a,va = 1e-10;  P'_vava = 2e-10.
    assert mean.tolist() == [30, 60, 0.5, 80, 0, 0, 0, 0]
    assert cov[0, 0] == pytest.approx(105) and cov[1, 1] == pytest.approx(105) and cov[3, 3] == pytest.approx(105)
    assert cov[0, 4] == pytest.approx(25) and cov[4, 0] == pytest.approx(25) and cov[3, 7] == pytest.approx(25)
    assert cov[4, 4] == pytest.approx(25.25) and cov[7, 7] == pytest.approx(25.25)
    assert cov[2, 2] == pytest.approx(2e-4 + 1e-10, rel=1e-12) and cov[2, 6] == pytest.approx(1e-10)
    assert cov[6, 6] == pytest.approx(2e-10)
    assert cov[0, 1] == 0 and cov[0, 5] == 0

    # Measure x = 41 (11 px right of the prediction). R_x = (80/20)^2 = 16, S_xx = 105 + 16 = 121.
    # K_x = 105/121, K_vx = 25/121 -> x = 30 + 11 * 105/121 = 39.5454..., vx = 11 * 25/121 = 2.2727...
    # P_xx = 105 - 105^2/121 = 105 * 16/121;  P_vv = 25.25 - 25^2/121;  P_xv = 25 - 105*25/121 = 25 * 16/121.
    new_mean, new_cov = kf.update(mean, cov, np.array([41.0, 60.0, 0.5, 80.0]))
    assert new_mean[0] == pytest.approx(30 + 11 * 105 / 121)
    assert new_mean[4] == pytest.approx(11 * 25 / 121)
    assert new_mean[[1, 2, 3, 5, 6, 7]].tolist() == pytest.approx([60, 0.5, 80, 0, 0, 0])
    assert new_cov[0, 0] == pytest.approx(105 * 16 / 121)
    assert new_cov[4, 4] == pytest.approx(25.25 - 25**2 / 121)
    assert new_cov[0, 4] == pytest.approx(25 * 16 / 121)
    assert np.allclose(new_cov, new_cov.T)


def test_kalman_noise_uses_the_state_height():
    kf = KalmanFilter()
    mean, _ = kf.initiate(np.array([0.0, 0.0, 1.0, 40.0]))
    mean[3] = 200.0  # the noise follows mean[3], not the initial measurement
    _, predicted = kf.predict(mean, np.zeros((8, 8)))
    # Q_x = (200/20)^2 = 100, Q_vx = (200/160)^2 = 1.5625.
    assert predicted[0, 0] == pytest.approx(100) and predicted[4, 4] == pytest.approx(1.5625)
    _, s = kf.project(mean, np.zeros((8, 8)))
    # R = diag(10^2, 10^2, 0.1^2, 10^2).
    assert np.diag(s).tolist() == pytest.approx([100, 100, 0.01, 100])


def test_kalman_learns_a_constant_velocity_and_leads_the_box():
    kf = KalmanFilter()
    box = np.array([100.0, 50.0, 150.0, 150.0])  # w 50, h 100
    mean, cov = kf.initiate(xyxy_to_xyah(box))
    for k in range(1, 101):
        mean, cov = kf.predict(mean, cov)
        mean, cov = kf.update(mean, cov, xyxy_to_xyah(box + [5 * k, 0, 5 * k, 0]))
    assert mean[4] == pytest.approx(5.0, abs=1e-3)  # vx -> 5 px / frame
    assert mean[5] == pytest.approx(0.0, abs=1e-9) and mean[7] == pytest.approx(0.0, abs=1e-9)
    last_cx = 125.0 + 5 * 100
    assert mean[0] == pytest.approx(last_cx, abs=1e-2)
    predicted, _ = kf.predict(mean, cov)
    assert predicted[0] == pytest.approx(last_cx + 5.0, abs=1e-2)  # leads the box by one step


# ---- candidate selection --------------------------------------------------------------------------

B0 = [100.0, 100.0, 200.0, 200.0]  # xyah (150, 150, 1, 100): round-trips exactly
FAR = [400.0, 400.0, 500.0, 500.0]


def warm_up(selector: CandidateSelector, box=B0, frames: int = 15) -> None:
    for _ in range(frames):
        selector.select_boxes(np.array([box, EMPTY, EMPTY]), np.array([0.9, 0.1, 0.1]), 5.0)


def test_warm_up_initiates_from_argmax_then_updates_for_15_frames():
    sel = CandidateSelector()
    first = sel.select_boxes(np.array([FAR, B0, EMPTY]), np.array([0.2, 0.9, 0.5]), 5.0)
    assert (first.phase, first.index, first.kf_score, first.filter_updated) == ("init", 1, None, True)
    assert first.box.tolist() == B0 and sel.stable_frames == 1
    assert sel.mean.tolist() == [150, 150, 1, 100, 0, 0, 0, 0]
    for n in range(2, 16):  # frames 2..15: argmax IoU, update, count
        s = sel.select_boxes(np.array([FAR, B0, EMPTY]), np.array([0.2, 0.9, 0.5]), 5.0)
        assert (s.phase, s.index, s.kf_score, s.filter_updated) == ("warmup", 1, None, True)
        assert sel.stable_frames == n
    assert sel.is_stable
    # Frame 16 is stable. Same box every frame: innovation 0, so the prediction is exactly B0.
    s = sel.select_boxes(np.array([FAR, B0, EMPTY]), np.array([0.2, 0.9, 0.5]), 5.0)
    assert s.phase == "stable" and s.index == 1 and s.kf_score == 1.0 and s.kf_box.tolist() == B0
    assert sel.stable_frames == 15  # the counter stops at the threshold


def test_stable_phase_prefers_the_candidate_on_the_motion_prediction():
    sel = CandidateSelector()
    warm_up(sel)
    # Candidate 0: far from the prediction, predicted IoU 0.9 -> 0.25 * 0 + 0.75 * 0.9 = 0.675
    # Candidate 1: on the prediction (IoU 1), predicted IoU 0.6 -> 0.25 * 1 + 0.75 * 0.6 = 0.700
    # Candidate 2: empty, predicted IoU 0.1                    -> 0.25 * 0 + 0.75 * 0.1 = 0.075
    s = sel.select_boxes(np.array([FAR, B0, EMPTY]), np.array([0.9, 0.6, 0.1]), 5.0)
    assert (s.index, s.kf_score, s.kalman_selected, s.filter_updated, s.restarted) == (1, 1.0, True, True, False)
    assert s.predicted_iou == pytest.approx(0.6) and s.box.tolist() == B0


def test_stable_phase_with_masks_partial_overlap():
    # Masks measured at their own resolution (box_space None). Warm up on rows/cols 10..29: box
    # [10, 10, 29, 29] -> xyah (19.5, 19.5, 1, 19), prediction [10, 10, 29, 29] exactly.
    sel = CandidateSelector(box_space=None)
    on_track = rect_mask(64, 64, 10, 29, 10, 29)
    shifted = rect_mask(64, 64, 10, 29, 20, 39)  # box [20, 10, 39, 29]
    far = rect_mask(64, 64, 40, 59, 40, 59)
    empty = np.full((64, 64), -8.0, dtype=np.float32)
    for _ in range(15):
        sel.select(np.stack([on_track, empty, empty]), np.array([0.9, 0.1, 0.1]), 3.0)
    # shifted vs prediction: intersection (29 - 20) * (29 - 10) = 9 * 19 = 171,
    # union 19*19 + 19*19 - 171 = 551 -> IoU 171/551 = 0.31034.
    # far: IoU 0, predicted 0.8 -> 0.75 * 0.8 = 0.6
    # shifted: predicted 0.7 -> 0.25 * 0.31034 + 0.75 * 0.7 = 0.6026 -> wins by the motion term.
    s = sel.select(np.stack([far, shifted, empty]), np.array([0.8, 0.7, 0.05]), 3.0)
    assert s.index == 1 and s.kf_score == pytest.approx(171 / 551, rel=1e-6) and s.kalman_selected
    assert s.box.tolist() == [20.0, 10.0, 39.0, 29.0]


def test_kf_score_weight_is_honoured_large_config():
    cfg = SamuraiConfig.for_model("large")
    assert cfg.kf_score_weight == 0.15
    sel = CandidateSelector(cfg)
    warm_up(sel)
    # w = 0.15: far 0.85 * 0.9 = 0.765 beats on-track 0.15 + 0.85 * 0.6 = 0.66.
    s = sel.select_boxes(np.array([FAR, B0, EMPTY]), np.array([0.9, 0.6, 0.1]), 5.0)
    assert (s.index, s.kf_score, s.kalman_selected) == (0, 0.0, False)
    assert s.filter_updated  # 0.9 >= 0.3: the filter follows the far box
    assert sel.mean[:4].tolist() != [150, 150, 1, 100]


def test_warm_up_restarts_when_best_iou_not_above_threshold():
    sel = CandidateSelector()
    warm_up(sel, frames=5)
    assert sel.stable_frames == 5
    # Best predicted IoU exactly 0.3: warm-up needs > 0.3 -> restart, no update.
    s = sel.select_boxes(np.array([FAR, B0, EMPTY]), np.array([0.3, 0.1, 0.2]), 5.0)
    assert (s.phase, s.index, s.restarted, s.filter_updated) == ("warmup", 0, True, False)
    assert sel.stable_frames == 0
    # Next frame re-initiates the filter from its own argmax box, with zero velocity and initial covariance.
    s = sel.select_boxes(np.array([EMPTY, FAR, B0]), np.array([0.1, 0.8, 0.4]), 5.0)
    assert (s.phase, s.index) == ("init", 1) and sel.stable_frames == 1
    assert sel.mean.tolist() == [450, 450, 1, 100, 0, 0, 0, 0]
    assert np.diag(sel.covariance).tolist() == pytest.approx([100, 100, 1e-4, 100, 39.0625, 39.0625, 1e-10, 39.0625])


def test_thresholds_compare_in_the_decoder_precision():
    # float32 0.3 is not > float32 0.3 (the reference compares a float32 tensor with 0.3), although as
    # float64 it is 0.30000001192...
    sel = CandidateSelector()
    warm_up(sel, frames=3)
    s = sel.select_boxes(np.array([B0, EMPTY, EMPTY]), np.array([0.3, 0.1, 0.2], dtype=np.float32), 5.0)
    assert s.restarted and sel.stable_frames == 0


def test_stable_phase_restarts_below_threshold_and_keeps_exactly_threshold():
    sel = CandidateSelector()
    warm_up(sel)
    # Exactly 0.3 in the stable phase is not < 0.3: update, stay stable.
    s = sel.select_boxes(np.array([B0, EMPTY, EMPTY]), np.array([0.3, 0.1, 0.2]), 5.0)
    assert s.filter_updated and not s.restarted and sel.is_stable
    # 0.25 < 0.3: restart; next multimask frame re-initiates.
    s = sel.select_boxes(np.array([B0, EMPTY, EMPTY]), np.array([0.25, 0.1, 0.2]), 5.0)
    assert s.phase == "stable" and s.restarted and not s.filter_updated and s.kf_score == 1.0
    assert sel.stable_frames == 0
    assert sel.select_boxes(np.array([B0, EMPTY, EMPTY]), np.array([0.9, 0.1, 0.2]), 5.0).phase == "init"


def test_single_mask_output_skips_the_filter():
    sel = CandidateSelector()
    warm_up(sel, frames=4)
    mean, cov = sel.mean.copy(), sel.covariance.copy()
    s = sel.select_boxes(np.array([FAR]), np.array([0.95]), 5.0)
    assert (s.phase, s.index, s.kf_score, s.filter_updated) == ("single", 0, None, False)
    assert s.box.tolist() == FAR
    assert sel.stable_frames == 4 and np.array_equal(sel.mean, mean) and np.array_equal(sel.covariance, cov)


def test_absent_object_blanks_every_candidate_box():
    sel = CandidateSelector()
    warm_up(sel)
    # logit -1.0 is not > -1: absent -> all boxes empty -> kf IoUs all 0 -> argmax predicted IoU.
    s = sel.select_boxes(np.array([B0, FAR, B0]), np.array([0.2, 0.5, 0.4]), -1.0)
    assert not s.present and s.index == 1 and s.kf_score == 0.0 and s.box.tolist() == EMPTY
    # The reference then updates the filter with the empty box (0.5 >= 0.3): centre pulled to the origin.
    assert s.filter_updated and sel.mean[0] < 150
    assert CandidateSelector().select_boxes(np.array([B0, FAR, B0]), np.array([0.2, 0.5, 0.4]), -0.5).present


@pytest.mark.parametrize(
    ("knob", "value", "says"),
    [
        ("memory_bank_iou_threshold", float("inf"), "finite"),
        ("memory_bank_iou_threshold", float("nan"), "finite"),
        ("memory_bank_obj_score_threshold", float("-inf"), "finite"),
        ("present_logit_threshold", float("nan"), "finite"),
        ("stable_ious_threshold", 1.5, "[-1, 1]"),
        ("memory_bank_iou_threshold", -1.5, "[-1, 1]"),
        ("memory_bank_kf_score_threshold", 2.0, "[-1, 1]"),
        ("kf_score_weight", 1.5, "[0, 1]"),
        ("kf_score_weight", float("nan"), "finite"),
    ],
)
def test_config_refuses_non_finite_and_out_of_range_knobs(knob: str, value: float, says: str) -> None:
    with pytest.raises(ValueError, match=f"{knob} must be .*{re.escape(says)}"):
        SamuraiConfig(**{knob: value})


def test_config_accepts_any_finite_logit_threshold() -> None:
    assert SamuraiConfig(memory_bank_obj_score_threshold=-3.0, present_logit_threshold=2.0).present_logit_threshold == 2.0


def test_selector_reset_forgets_the_filter():
    sel = CandidateSelector()
    warm_up(sel)
    sel.reset()
    assert sel.mean is None and sel.stable_frames == 0 and not sel.is_stable
    assert sel.select_boxes(np.array([B0, FAR, FAR]), np.array([0.9, 0.1, 0.1]), 1.0).phase == "init"


def test_selector_upsamples_low_res_masks_into_box_space():
    sel = CandidateSelector(box_space=(16, 16))
    m = -np.ones((4, 4), dtype=np.float32)
    m[1, 1] = 3.0  # box [3, 3, 8, 8] in the 16x16 space (see the upsampling test)
    s = sel.select(np.stack([m, m, m]), np.array([0.5, 0.9, 0.1]), 1.0)
    assert s.index == 1 and s.box.tolist() == [3.0, 3.0, 8.0, 8.0]


# ---- memory bank ----------------------------------------------------------------------------------


def mem(frame: int) -> np.ndarray:
    return np.full((2, 2, 2), frame, dtype=np.float16)


def ptr(frame: int) -> np.ndarray:
    return np.full(4, frame, dtype=np.float32)


# frame: (predicted IoU, object score logit, kf score)
SCENARIO = {
    1: (0.9, 5.0, None),  # usable by scores, but the reference's walk never reaches frame 1
    2: (0.9, 5.0, None),
    3: (0.9, 5.0, None),
    4: (0.9, 5.0, None),
    5: (0.9, 5.0, 0.8),
    6: (0.9, -0.5, 0.8),  # object score not > 0
    7: (0.6, 2.0, 0.4),
    8: (0.9, 2.0, 0.0),  # kf score not > 0
    9: (0.51, 0.1, 0.01),
    10: (0.2, 3.0, 0.9),  # predicted IoU not > 0.5, but it is the previous frame of 11
}


def scenario_bank(config: SamuraiConfig | None = None) -> MemoryBank:
    bank = MemoryBank(config)
    bank.add_conditioning(0, mem(0), ptr(0))
    for f, (iou, obj, kf) in SCENARIO.items():
        bank.add_frame(f, mem(f), ptr(f), iou, obj, kf)
    return bank


def test_memory_selection_filters_frames_and_keeps_previous_and_prompt():
    sel = scenario_bank().select_for(11)
    # Walk back from 10 to 2: usable 9, 7, 5, 4, 3, 2 -> [2, 3, 4, 5, 7, 9]; 10 is appended as the
    # previous frame -> [2, 3, 4, 5, 7, 9, 10]; the last 6 get t_pos 1..6 by ORDER: frame 3 gets
    # t_pos 1 although it is 8 frames back. The prompt frame 0 gets t_pos 0.
    assert sel.memory_frames == [0, 3, 4, 5, 7, 9, 10]
    assert sel.tpos == [0, 1, 2, 3, 4, 5, 6]
    assert sel.tpos_enc_index == [6, 5, 4, 3, 2, 1, 0]  # maskmem_tpos_enc[num_maskmem - t_pos - 1]
    assert [int(m.flat[0]) for m in sel.memories] == sel.memory_frames
    # Pointers are not filtered: prompt (t diff 11 - 0) then frames 10, 9, ..., 1 (t diff 1..10).
    assert sel.obj_ptr_frames == [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert sel.obj_ptr_tdiff == [11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [int(p[0]) for p in sel.obj_ptrs] == sel.obj_ptr_frames
    assert sel.obj_ptr_tdiff_max == 15


def test_unusable_frame_is_dropped_once_it_is_no_longer_previous():
    bank = scenario_bank()
    assert bank.stored_memory_frames == [3, 4, 5, 7, 9, 10]  # exactly what frame 11 can use
    bank.add_frame(11, mem(11), ptr(11), 0.9, 1.0, 0.5)
    # usable [2, 3, 4, 5, 7, 9, 11]; 11 is the previous frame and usable -> last 6: [3, 4, 5, 7, 9, 11]
    assert bank.select_for(12).memory_frames == [0, 3, 4, 5, 7, 9, 11]
    assert bank.stored_memory_frames == [3, 4, 5, 7, 9, 11]


def test_first_frames_and_the_walk_quirk():
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    first = bank.select_for(1)
    assert (first.memory_frames, first.tpos, first.obj_ptr_frames, first.obj_ptr_tdiff) == ([0], [0], [0], [1])
    bank.add_frame(1, mem(1), ptr(1), 0.9, 5.0, None)
    assert bank.select_for(2).memory_frames == [0, 1] and bank.select_for(2).tpos == [0, 6]
    bank.add_frame(2, mem(2), ptr(2), 0.9, 5.0, None)
    # range(2, 1, -1) == [2]: frame 1 is never walked to, so only the prompt and frame 2.
    assert bank.select_for(3).memory_frames == [0, 2]
    plain = MemoryBank(SamuraiConfig(memory_walk_skips_first_tracked_frame=False))
    plain.add_conditioning(0, mem(0), ptr(0))
    plain.add_frame(1, mem(1), ptr(1), 0.9, 5.0, None)
    plain.add_frame(2, mem(2), ptr(2), 0.9, 5.0, None)
    assert plain.select_for(3).memory_frames == [0, 1, 2] and plain.select_for(3).tpos == [0, 5, 6]


def test_missing_previous_frame_still_takes_its_slot():
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    for f in range(1, 6):
        bank.add_frame(f, mem(f), ptr(f), 0.9, 5.0, None)
    # Frame 6 never tracked: [2, 3, 4, 5] + [6] -> t_pos 2..6, frame 6 absent -> t_pos 6 unused.
    sel = bank.select_for(7)
    assert sel.memory_frames == [0, 2, 3, 4, 5] and sel.tpos == [0, 2, 3, 4, 5]
    assert sel.obj_ptr_tdiff == [7, 2, 3, 4, 5, 6]


def test_memory_thresholds_are_configurable():
    strict = scenario_bank(SamuraiConfig(memory_bank_iou_threshold=0.95)).select_for(11)
    assert strict.memory_frames == [0, 10]  # nothing usable: prompt + previous frame
    lenient = scenario_bank(SamuraiConfig(memory_bank_kf_score_threshold=-1.0)).select_for(11)
    assert lenient.memory_frames == [0, 4, 5, 7, 8, 9, 10]  # frame 8 (kf 0.0) now usable
    obj = scenario_bank(SamuraiConfig(memory_bank_obj_score_threshold=-1.0)).select_for(11)
    assert obj.memory_frames == [0, 4, 5, 6, 7, 9, 10]  # frame 6 (logit -0.5) now usable
    few = scenario_bank(SamuraiConfig(num_maskmem=3, max_obj_ptrs=4)).select_for(11)
    assert few.memory_frames == [0, 9, 10] and few.tpos == [0, 1, 2]
    assert few.obj_ptr_frames == [0, 10, 9, 8] and few.obj_ptr_tdiff_max == 3


def test_pointer_window_follows_num_frames():
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    for f in range(1, 9):
        bank.add_frame(f, mem(f), ptr(f), 0.9, 5.0, None)
    sel = bank.select_for(9, num_frames=10)
    # max pointers = min(10, 16) = 10: t diff 1..9 -> frames 8..1 (0 is the prompt, counted once).
    assert sel.obj_ptr_tdiff == [9, 1, 2, 3, 4, 5, 6, 7, 8] and sel.obj_ptr_tdiff_max == 9


def test_prompt_on_a_tracked_frame_replaces_it_and_order_is_enforced():
    bank = scenario_bank()
    bank.add_conditioning(10, mem(100), ptr(100))
    sel = bank.select_for(11)
    # Two prompts at t_pos 0; the previous frame (10) is now a prompt: its slot (t_pos 6) is consumed,
    # unused, as in the reference (its walk would raise KeyError on a prompt frame; prompts are skipped here).
    assert sel.memory_frames == [0, 10, 3, 4, 5, 7, 9] and sel.tpos == [0, 0, 1, 2, 3, 4, 5]
    assert sel.obj_ptr_frames[:3] == [0, 10, 9] and sel.obj_ptr_tdiff[:3] == [11, 1, 2]
    with pytest.raises(ValueError):
        bank.add_frame(10, mem(10), ptr(10), 0.9, 1.0, None)
    with pytest.raises(ValueError):
        bank.add_frame(5, mem(5), ptr(5), 0.9, 1.0, None)
    with pytest.raises(ValueError):
        bank.select_for(9)
    with pytest.raises(ValueError):
        MemoryBank().select_for(3)


def reference_selection(records: dict, frame_idx: int, num_frames: int | None = None):
    """The reference loops, literally, over every frame ever tracked (prompt on frame 0)."""
    valid = []
    if frame_idx > 1:
        for i in range(frame_idx - 1, 1, -1):
            iou, obj, kf = records[i]
            if iou > 0.5 and obj > 0.0 and (kf is None or kf > 0.0):
                valid.insert(0, i)
            if len(valid) >= 16 - 1:
                break
    if frame_idx - 1 not in valid:
        valid.append(frame_idx - 1)
    frames, tpos = [0], [0]
    for t_pos in range(1, 7):
        idx = t_pos - 7
        if idx < -len(valid):
            continue
        if valid[idx] in records:
            frames.append(valid[idx])
            tpos.append(t_pos)
    max_ptrs = min(num_frames, 16) if num_frames is not None else 16
    ptr_frames, tdiff = [0], [frame_idx]
    for t_diff in range(1, max_ptrs):
        t = frame_idx - t_diff
        if t < 0:
            break
        if t in records:
            ptr_frames.append(t)
            tdiff.append(t_diff)
    return frames, tpos, ptr_frames, tdiff


def test_long_run_is_bounded_and_matches_the_unpruned_reference():
    rng = np.random.default_rng(7)
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    records: dict[int, tuple] = {}
    for f in range(1, 201):
        sel = bank.select_for(f)
        assert (sel.memory_frames, sel.tpos, sel.obj_ptr_frames, sel.obj_ptr_tdiff) == reference_selection(records, f)
        assert len(sel.memories) <= 7 and len(sel.obj_ptrs) <= 16
        assert [int(m.flat[0]) for m in sel.memories] == sel.memory_frames
        iou = float(rng.uniform(0.2, 1.0))
        obj = float(rng.normal(1.0, 2.0))
        kf = None if rng.random() < 0.2 else float(rng.uniform(-0.2, 1.0))
        records[f] = (iou, obj, kf)
        bank.add_frame(f, mem(f), ptr(f), iou, obj, kf)
        assert len(bank.stored_memory_frames) <= 6 and len(bank.stored_pointer_frames) <= 15
    final = bank.select_for(201)
    assert len(final.obj_ptrs) == 16 and final.obj_ptr_tdiff == [201, *range(1, 16)]


def test_selector_and_bank_together_on_a_moving_object():
    """200 frames of a box moving right 2 px / frame; from frame 20 a same-sized distractor 300 px
    away gets the higher predicted IoU every 10th frame. The motion term keeps the tracked box
    (track ~ 0.25 * ~1 + 0.75 * 0.8 = 0.85 > distractor 0.25 * 0 + 0.75 * 0.85 = 0.64); nothing grows."""
    sel, bank = CandidateSelector(), MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    distractor_wins = 0
    for f in range(1, 201):
        x = 100.0 + 2.0 * f
        track = [x, 300.0, x + 80.0, 380.0]
        distractor = [x + 300.0, 300.0, x + 380.0, 380.0]
        ious = np.array([0.8, 0.85, 0.2]) if f % 10 == 0 and f >= 20 else np.array([0.9, 0.3, 0.2])
        s = sel.select_boxes(np.array([track, distractor, EMPTY]), ious, 4.0)
        if s.index == 1:
            distractor_wins += 1
        if f > 15:
            assert s.phase == "stable" and s.index == 0 and s.kf_score > 0.9
        m = bank.select_for(f)
        assert len(m.memories) <= 7 and len(m.obj_ptrs) <= 16
        bank.add_frame(f, mem(f), ptr(f), s.predicted_iou, s.object_score_logit, s.kf_score)
    assert distractor_wins == 0
    assert sel.mean[4] == pytest.approx(2.0, abs=1e-3)


def test_config_presets_and_validation():
    assert SamuraiConfig() == SamuraiConfig.for_model("tiny") == SamuraiConfig.for_model("base_plus")
    assert SamuraiConfig.for_model("large", num_maskmem=5).num_maskmem == 5
    with pytest.raises(ValueError):
        SamuraiConfig.for_model("huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SamuraiConfig(kf_score_weight=1.5)


def test_tracking_core_imports_no_heavy_dependencies():
    code = (
        "import sys, server.tracking, server.tracking.snapshot; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'grpc', 'tritonclient', 'scipy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_conditioning_frames_stay_bounded() -> None:
    # A client correcting every frame must not grow the bank without bound: the first prompt and
    # the most recent corrections are kept (max_conditioning_frames, 4 by default).
    bank = MemoryBank(SamuraiConfig())
    memory, pointer = np.zeros((1, 4, 2, 2), np.float16), np.zeros(8, np.float32)
    for frame in range(50):
        bank.add_conditioning(frame, memory, pointer)
    assert bank.conditioning_frames == [0, 47, 48, 49]
    unbounded = MemoryBank(SamuraiConfig(max_conditioning_frames=None))
    for frame in range(50):
        unbounded.add_conditioning(frame, memory, pointer)
    assert len(unbounded.conditioning_frames) == 50
