"""SAMURAI's part of the video predictor: the Kalman-filtered choice among the decoder's
candidates and the memory bank that says which frames memory attention reads. Pure numpy: no
torch, no gRPC, no Triton.

Per object and per frame, the video predictor (server/sam2/video_predictor.py)
1. asks ``MemoryBank.select_for(t)`` which memories / object pointers the memory attention reads,
2. runs the mask decoder and hands all candidates to ``CandidateSelector.select`` (Kalman filter on
   the candidates' boxes: ``kalman.py``, ``boxes.py``),
3. encodes the chosen mask and stores it with ``MemoryBank.add_frame`` (prompt frames:
   ``add_conditioning``).

``snapshot.py`` writes this state as versioned bytes (no pickle) for a session handoff.

Reference: yangchris11/samurai (sam2/sam2/modeling/sam2_base.py, sam2/sam2/utils/kalman_filter.py).
"""

from server.sam2.samurai.boxes import (
    EMPTY_BOX,
    box_from_mask,
    box_from_mask_upsampled,
    box_iou,
    box_ious,
    upsample_bilinear,
    xyah_to_xyxy,
    xyxy_to_xyah,
)
from server.sam2.samurai.kalman import KalmanFilter
from server.sam2.samurai.memory_bank import BankState, MemoryBank, MemorySelection
from server.sam2.samurai.selection import CandidateSelector, SamuraiConfig, Selection

__all__ = [
    "EMPTY_BOX",
    "BankState",
    "CandidateSelector",
    "KalmanFilter",
    "MemoryBank",
    "MemorySelection",
    "SamuraiConfig",
    "Selection",
    "box_from_mask",
    "box_from_mask_upsampled",
    "box_iou",
    "box_ious",
    "upsample_bilinear",
    "xyah_to_xyxy",
    "xyxy_to_xyah",
]
