"""SAMURAI's motion-aware choice among SAM 2's candidate masks, one object at a time.

Reference: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py, SAM2Base._forward_sam_heads (the
``multimask_output and self.samurai_mode`` branch). Per frame with the 3 multimask candidates:

- start (no filter yet, or after a restart): pick argmax predicted IoU; initiate the Kalman filter
  from that candidate's box; this is warm-up frame 1.
- warm-up (fewer than ``stable_frames_threshold`` frames): predict; pick argmax predicted IoU; if its
  predicted IoU > ``stable_ious_threshold`` update the filter with its box and count the frame, else
  restart (counter to 0: the next frame initiates the filter afresh; this frame's filter is only
  predicted).
- stable: predict; score_i = w * IoU(predicted box, box_i) + (1 - w) * predicted_iou_i with
  w = ``kf_score_weight``; pick the argmax; if the pick's predicted IoU < ``stable_ious_threshold``
  restart, else update the filter with its box. The pick's IoU with the prediction is its kf score.

Frames with a single mask (a box prompt: 2 points > multimask_max_pt_num = 1) skip all of this: index
0, no filter step, no kf score. An object whose score logit is <= ``present_logit_threshold`` (-1)
has every candidate mask blanked (NO_OBJ_SCORE) before measuring, so all its boxes are empty.

Comparisons and the weighted score run in the dtype of the predicted IoUs (float32 from the decoder,
as in the reference, where 0.3 becomes float32 0.3 when compared with a float32 tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from server.sam2.samurai.boxes import (
    EMPTY_BOX,
    box_from_mask,
    box_from_mask_upsampled,
    box_ious,
    xyah_to_xyxy,
    xyxy_to_xyah,
)
from server.sam2.samurai.kalman import KalmanFilter

ModelSize = Literal["tiny", "small", "base_plus", "large"]


@dataclass(frozen=True)
class SamuraiConfig:
    """SAMURAI's knobs; defaults are sam2/sam2/configs/samurai/sam2.1_hiera_t.yaml (and SAM 2.1's)."""

    kf_score_weight: float = 0.25  # 0.15 for large
    stable_frames_threshold: int = 15
    stable_ious_threshold: float = 0.3
    # Reference name min_obj_score_logits: object present iff score logit > this (masks blanked otherwise).
    present_logit_threshold: float = -1.0
    memory_bank_iou_threshold: float = 0.5
    memory_bank_obj_score_threshold: float = 0.0
    memory_bank_kf_score_threshold: float = 0.0
    num_maskmem: int = 7  # 1 conditioning slot (t_pos 0) + num_maskmem - 1 recent memories
    # Reference name max_obj_ptrs_in_encoder: pointer window of max_obj_ptrs - 1 past frames (+ prompts).
    max_obj_ptrs: int = 16
    # The reference walks back over frames range(frame_idx - 1, 1, -1) with the prompt on frame 0,
    # so the first tracked frame after the prompt is never a "usable" memory (only the previous one).
    memory_walk_skips_first_tracked_frame: bool = True
    # Conditioning (prompt) frames kept per object: the first prompt and the most recent ones.
    # The reference keeps all (max_cond_frames_in_attn = -1); a service must stay bounded when a
    # client corrects every frame. None: unbounded, as the reference.
    max_conditioning_frames: int | None = 4

    def __post_init__(self) -> None:
        # A NaN compares false with everything, so it would silently switch a rule off (and inf
        # would keep every memory out of the bank): every knob must be a finite number.
        for name in _FLOAT_KNOBS:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.kf_score_weight <= 1.0:
            raise ValueError(f"kf_score_weight must be in [0, 1], got {self.kf_score_weight}")
        for name in _IOU_THRESHOLDS:
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [-1, 1] (an IoU threshold; below 0 admits every IoU), got {getattr(self, name)}")
        if self.stable_frames_threshold < 1:
            raise ValueError(f"stable_frames_threshold must be >= 1, got {self.stable_frames_threshold}")
        if self.num_maskmem < 1:
            raise ValueError(f"num_maskmem must be >= 1, got {self.num_maskmem}")
        if self.max_obj_ptrs < 1:
            raise ValueError(f"max_obj_ptrs must be >= 1, got {self.max_obj_ptrs}")
        if self.max_conditioning_frames is not None and self.max_conditioning_frames < 1:
            raise ValueError(f"max_conditioning_frames must be >= 1, got {self.max_conditioning_frames}")

    @classmethod
    def for_model(cls, size: ModelSize, **overrides: object) -> SamuraiConfig:
        """The reference's configs/samurai/sam2.1_hiera_{t,s,b+,l}.yaml: only kf_score_weight differs."""
        weights = {"tiny": 0.25, "small": 0.25, "base_plus": 0.25, "large": 0.15}
        if size not in weights:
            raise ValueError(f"unknown SAM 2.1 size {size!r}; expected one of {sorted(weights)}")
        return cls(**{"kf_score_weight": weights[size], **overrides})  # type: ignore[arg-type]


Phase = Literal["single", "init", "warmup", "stable"]


_FLOAT_KNOBS = (
    "kf_score_weight",
    "stable_ious_threshold",
    "present_logit_threshold",
    "memory_bank_iou_threshold",
    "memory_bank_obj_score_threshold",
    "memory_bank_kf_score_threshold",
)
# Thresholds on IoUs (predicted, chosen, Kalman), each compared strictly (IoU > threshold):
# 1 admits nothing, anything below 0 admits every IoU, beyond that a value means nothing.
_IOU_THRESHOLDS = ("stable_ious_threshold", "memory_bank_iou_threshold", "memory_bank_kf_score_threshold")


@dataclass(frozen=True)
class Selection:
    """What the selector chose on one frame for one object."""

    index: int  # into the candidates given (0..N-1)
    box: np.ndarray  # xyxy of the chosen candidate in box space (inclusive pixels); zeros if empty/absent
    predicted_iou: float  # the chosen candidate's predicted IoU (the reference's best_iou_score)
    kf_score: float | None  # IoU(Kalman prediction, chosen box) in the stable phase, else None
    present: bool  # object score logit > present_logit_threshold
    object_score_logit: float
    phase: Phase  # which branch ran: single mask, filter (re)initiated, warm-up, stable
    kalman_selected: bool  # the motion score changed the pick (stable, index != argmax predicted IoU)
    kf_box: np.ndarray | None  # the Kalman prediction (xyxy) scored against, stable phase only
    filter_updated: bool  # the filter was initiated or corrected with the chosen box
    restarted: bool  # warm-up restarts: the next multimask frame re-initiates the filter


class CandidateSelector:
    """Per-object SAMURAI state: Kalman mean (8), covariance (8x8), warm-up counter.

    ``box_space``: (H, W) the reference measures boxes in, i.e. (image_size, image_size). Masks given
    at a lower resolution (the decoder's S/4 logits) are bilinearly upsampled to it, exactly as the
    reference does, before measuring. None measures the masks at the resolution given.
    """

    def __init__(self, config: SamuraiConfig | None = None, box_space: tuple[int, int] | None = None) -> None:
        self.config = config or SamuraiConfig()
        self.box_space = box_space
        self.kf = KalmanFilter()
        self.mean: np.ndarray | None = None
        self.covariance: np.ndarray | None = None
        self.stable_frames = 0

    def reset(self) -> None:
        """Forget the motion model (a new object, or a fresh start on a new prompt)."""
        self.mean, self.covariance, self.stable_frames = None, None, 0

    @property
    def is_stable(self) -> bool:
        return self.mean is not None and self.stable_frames >= self.config.stable_frames_threshold

    def measure(self, mask_logits: np.ndarray) -> np.ndarray:
        """Box of one candidate's logits, in box space."""
        if self.box_space is not None and tuple(mask_logits.shape[-2:]) != tuple(self.box_space):
            return box_from_mask_upsampled(mask_logits, self.box_space)
        return box_from_mask(mask_logits)

    def select(self, mask_logits: np.ndarray, predicted_ious: np.ndarray, object_score_logit: float) -> Selection:
        """Choose among candidate masks [N, h, w] (N = 3 multimask candidates, or 1 single mask)."""
        masks = np.asarray(mask_logits)
        if masks.ndim != 3:
            raise ValueError(f"mask_logits must be [N, h, w], got shape {masks.shape}")
        return self._select(masks.shape[0], predicted_ious, object_score_logit, lambda i: self.measure(masks[i]))

    def select_boxes(self, boxes: np.ndarray, predicted_ious: np.ndarray, object_score_logit: float) -> Selection:
        """Same, from candidate boxes [N, 4] already measured (xyxy, reference convention)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return self._select(len(boxes), predicted_ious, object_score_logit, lambda i: boxes[i].copy())

    def _select(
        self, n: int, predicted_ious: np.ndarray, object_score_logit: float, box_of: Callable[[int], np.ndarray]
    ) -> Selection:
        cfg = self.config
        ious = np.asarray(predicted_ious).reshape(-1)
        if not np.issubdtype(ious.dtype, np.floating):
            ious = ious.astype(np.float64)
        if ious.shape[0] != n or n == 0:
            raise ValueError(f"{n} candidates but {ious.shape[0]} predicted IoUs")
        dtype = ious.dtype.type  # compare / weigh in the decoder's precision, like the reference
        logit = float(object_score_logit)
        present = logit > cfg.present_logit_threshold

        def measured(i: int) -> np.ndarray:
            return box_of(i) if present else EMPTY_BOX.copy()  # absent: masks blanked to NO_OBJ_SCORE

        def result(
            index: int,
            box: np.ndarray,
            phase: Phase,
            *,
            updated: bool = False,
            restarted: bool = False,
            kf_ious: np.ndarray | None = None,
            kf_box: np.ndarray | None = None,
        ) -> Selection:
            return Selection(
                index=index,
                box=box,
                predicted_iou=float(ious[index]),
                kf_score=None if kf_ious is None else float(kf_ious[index]),
                present=present,
                object_score_logit=logit,
                phase=phase,
                kalman_selected=kf_ious is not None and index != int(np.argmax(ious)),
                kf_box=kf_box,
                filter_updated=updated,
                restarted=restarted,
            )

        if n == 1:  # single-mask output: the reference's SAMURAI branch does not run
            return result(0, measured(0), "single")

        threshold = dtype(cfg.stable_ious_threshold)
        if self.mean is None or self.covariance is None or self.stable_frames == 0:
            best = int(np.argmax(ious))
            box = measured(best)
            self.mean, self.covariance = self.kf.initiate(xyxy_to_xyah(box))
            self.stable_frames = 1
            return result(best, box, "init", updated=True)

        self.mean, self.covariance = self.kf.predict(self.mean, self.covariance)
        if self.stable_frames < cfg.stable_frames_threshold:
            best = int(np.argmax(ious))
            box = measured(best)
            if ious[best] > threshold:
                self.mean, self.covariance = self.kf.update(self.mean, self.covariance, xyxy_to_xyah(box))
                self.stable_frames += 1
                return result(best, box, "warmup", updated=True)
            self.stable_frames = 0
            return result(best, box, "warmup", restarted=True)

        boxes = [measured(i) for i in range(n)]
        kf_box = xyah_to_xyxy(self.mean[:4])
        kf_ious = box_ious(kf_box, boxes).astype(ious.dtype)
        weight = dtype(cfg.kf_score_weight)
        scores = weight * kf_ious + dtype(1.0 - cfg.kf_score_weight) * ious
        best = int(np.argmax(scores))
        if ious[best] < threshold:
            self.stable_frames = 0
            return result(best, boxes[best], "stable", restarted=True, kf_ious=kf_ious, kf_box=kf_box)
        self.mean, self.covariance = self.kf.update(self.mean, self.covariance, xyxy_to_xyah(boxes[best]))
        return result(best, boxes[best], "stable", updated=True, kf_ious=kf_ious, kf_box=kf_box)
