"""SAM 2 low-resolution mask logits -> a mask at the image's resolution, its box and COCO RLE
(the post-processing both predictors share)."""

from __future__ import annotations

import cv2
import numpy as np

from framewise.v1 import common_pb2
from server.vision import rle


def mask_at_resolution(
    mask_logits: np.ndarray, width: int, height: int
) -> tuple[common_pb2.RleMask, tuple[float, float, float, float]]:
    """Bilinear upsampling of the logits (as SAM 2 does), threshold at 0; the tight box of the
    mask in pixels (x2/y2 exclusive), all zero for an empty mask."""
    full = cv2.resize(mask_logits.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0
    rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
    box = (
        (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
        if rows.size
        else (0.0, 0.0, 0.0, 0.0)
    )
    return common_pb2.RleMask(height=height, width=width, counts=rle.encode(full)), box
