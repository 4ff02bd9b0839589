"""Decode the COCO RLE masks the tracker returns (same result as pycocotools' mask.decode)."""

from __future__ import annotations

import numpy as np

from framewise.v1 import common_pb2


def decode_rle(mask: common_pb2.RleMask) -> np.ndarray:
    """RleMask -> HxW bool array."""
    runs: list[int] = []
    data = mask.counts.encode("ascii")
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            c = data[pos] - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift  # sign-extend the last 5-bit group
        if len(runs) > 2:
            value += runs[-2]  # counts after the second are stored as differences
        runs.append(value)
    flat = np.zeros(mask.height * mask.width, dtype=bool)
    position, foreground = 0, False
    for run in runs:
        if foreground:
            flat[position : position + run] = True
        position += run
        foreground = not foreground
    return flat.reshape((mask.height, mask.width), order="F")
