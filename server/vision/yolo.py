"""Decode YOLOv8's raw head (cx, cy, w, h + class scores per anchor) into boxes, with NMS."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class RawDetections:
    boxes: np.ndarray  # Nx4 float32 x1,y1,x2,y2 in model pixels
    scores: np.ndarray  # N float32
    class_ids: np.ndarray  # N int32


def decode_yolov8(
    output: np.ndarray,
    *,
    confidence: float,
    iou: float,
    max_detections: int,
    class_mask: np.ndarray | None,
) -> RawDetections:
    """output: [4 + num_classes, num_anchors] for one image (scores already sigmoid-ed).

    class_mask: boolean [num_classes], the classes to keep (None: all). NMS is per class, as
    Ultralytics does by default (a person box never suppresses a bus box).
    """
    scores_all = output[4:]
    class_index = np.arange(scores_all.shape[0])
    if class_mask is not None:
        # Score only the requested classes (usually just "person"): 1 row instead of 80.
        class_index = np.flatnonzero(class_mask)
        if class_index.size == 0:
            return _empty()
        scores_all = scores_all[class_index]
    best = scores_all.argmax(axis=0)
    scores = np.take_along_axis(scores_all, best[None], axis=0)[0]
    keep = scores > confidence
    if not keep.any():
        return _empty()
    class_ids = class_index[best]
    cx, cy, w, h = output[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)
    scores, class_ids = scores[keep].astype(np.float32), class_ids[keep].astype(np.int32)

    # Class-aware NMS in one call: shift each class's boxes into a region of its own (wider than
    # every box's extent, negative corners included).
    offset = class_ids[:, None].astype(np.float32) * (boxes.max() - min(boxes.min(), 0.0) + 1.0)
    shifted = boxes + offset
    xywh = np.concatenate([shifted[:, :2], shifted[:, 2:] - shifted[:, :2]], axis=1)
    kept = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), confidence, iou, top_k=max_detections)
    kept = np.asarray(kept, dtype=np.int64).reshape(-1)
    if kept.size == 0:
        return _empty()
    kept = kept[np.argsort(-scores[kept], kind="stable")][:max_detections]
    return RawDetections(boxes[kept], scores[kept], class_ids[kept])


def _empty() -> RawDetections:
    return RawDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
