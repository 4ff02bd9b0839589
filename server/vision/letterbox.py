"""Letterbox resize (aspect ratio kept, padded to the model's input size), as YOLOv8 expects.

The same arithmetic as Ultralytics' LetterBox(auto=False, center=True): scale by
min(H/h, W/w), round the new size, split the padding evenly (the odd pixel goes right/bottom).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Letterbox:
    scale: float  # model pixels per source pixel
    pad_left: int
    pad_top: int

    def to_source(self, boxes: np.ndarray, source_size: tuple[int, int]) -> np.ndarray:
        """Map Nx4 x1,y1,x2,y2 boxes from model pixels back to source pixels, clipped."""
        width, height = source_size
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_left) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_top) / self.scale
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
        return out


def letterbox(rgb: np.ndarray, size: tuple[int, int], pad_value: int) -> tuple[np.ndarray, Letterbox]:
    """Resize HxWx3 `rgb` into a (height, width) = `size` canvas; returns the canvas and the mapping."""
    target_h, target_w = size
    src_h, src_w = rgb.shape[:2]
    scale = min(target_h / src_h, target_w / src_w)
    # At least one pixel: a 1 x 5000 strip would otherwise round to a zero-sized resize.
    new_w, new_h = max(1, int(round(src_w * scale))), max(1, int(round(src_h * scale)))
    pad_w, pad_h = (target_w - new_w) / 2, (target_h - new_h) / 2
    left, top = int(round(pad_w - 0.1)), int(round(pad_h - 0.1))
    right, bottom = target_w - new_w - left, target_h - new_h - top
    resized = rgb if (new_w, new_h) == (src_w, src_h) else cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas = cv2.copyMakeBorder(resized, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(pad_value,) * 3)
    return canvas, Letterbox(scale, left, top)
