"""SAMURAI's choice among the decoder's candidates (server/sam2/samurai/selection.py): warm-up,
the stable phase's motion score, restarts, and the options (SamuraiConfig) and their checks;
pure numpy, hand-computed expectations.

Reference behaviour: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from server.sam2.samurai import CandidateSelector, SamuraiConfig
from tests.unit.sam2.test_samurai_boxes import EMPTY, rect_mask

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


def test_config_presets_and_validation():
    assert SamuraiConfig() == SamuraiConfig.for_model("tiny") == SamuraiConfig.for_model("base_plus")
    assert SamuraiConfig.for_model("large", num_maskmem=5).num_maskmem == 5
    with pytest.raises(ValueError):
        SamuraiConfig.for_model("huge")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SamuraiConfig(kf_score_weight=1.5)
