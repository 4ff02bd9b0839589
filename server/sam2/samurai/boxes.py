"""Boxes as SAMURAI measures them, and the IoU it scores candidates with.

Convention (reference: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py, _forward_sam_heads):

- A box is ``[x_min, y_min, x_max, y_max]`` over the pixels whose mask logit is > 0, as INCLUSIVE
  pixel indices with no +1: width = x_max - x_min, so a one-pixel mask has width 0.
- An empty mask gives ``[0, 0, 0, 0]``; IoU treats that box as "no box" (IoU 0).
- Boxes live in the model's input square (image_size x image_size, 1024 for SAM 2.1): the reference
  measures the candidates after bilinearly upsampling the decoder's low-res logits (S/4) to that size.
  ``box_from_mask_upsampled`` does that exactly without building the full-size mask.
- The Kalman filter works on (cx, cy, a = w / h, h); a zero height becomes 1 on the way in.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

EMPTY_BOX = np.zeros(4, dtype=np.float64)
EMPTY_BOX.setflags(write=False)


def _positive_extent(mask_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices of the rows and of the columns holding a logit > 0, or None when there is none."""
    positive = np.asarray(mask_logits) > 0.0
    rows = np.flatnonzero(positive.any(axis=1))
    if rows.size == 0:
        return None
    return rows, np.flatnonzero(positive.any(axis=0))


def box_from_mask(mask_logits: np.ndarray) -> np.ndarray:
    """[x_min, y_min, x_max, y_max] of the pixels with logit > 0 (inclusive indices), zeros if none."""
    extent = _positive_extent(mask_logits)
    if extent is None:
        return EMPTY_BOX.copy()
    rows, cols = extent
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


@lru_cache(maxsize=16)
def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix W with ``out = W @ in`` equal to 1-D linear interpolation as
    torch's F.interpolate(mode="bilinear", align_corners=False) does it:
    src = (dst + 0.5) * in / out - 0.5, clamped at 0; neighbours floor(src) and floor(src) + 1
    (clamped to the last pixel); weights 1 - frac and frac."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    weights = np.zeros((out_size, in_size), dtype=np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), (1.0 - frac).astype(np.float32))
    np.add.at(weights, (rows, i1), frac.astype(np.float32))
    weights.setflags(write=False)
    return weights


def upsample_bilinear(mask_logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample [..., h, w] logits to [..., H, W] in float32, like F.interpolate(bilinear,
    align_corners=False): interpolate along x first, then along y (the order torch's kernel uses)."""
    logits = np.asarray(mask_logits, dtype=np.float32)
    wy = bilinear_weights(logits.shape[-2], size[0])
    wx = bilinear_weights(logits.shape[-1], size[1])
    return wy @ (logits @ wx.T)


@lru_cache(maxsize=16)
def _reach(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the 1-D bilinear map: (first, last) output index reading each input index, and
    (lo, hi) input indices each output index reads (its weights are non-zero only there)."""
    read = bilinear_weights(in_size, out_size) != 0  # [out, in]
    first_out = read.argmax(axis=0)
    last_out = out_size - 1 - read[::-1].argmax(axis=0)
    lo_in = read.argmax(axis=1)
    hi_in = in_size - 1 - read[:, ::-1].argmax(axis=1)
    return first_out, last_out, lo_in, hi_in


def box_from_mask_upsampled(mask_logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``box_from_mask(upsample_bilinear(mask_logits, size))`` without the full-size mask.

    Exact: an output pixel is a convex combination of (at most) 2x2 input pixels, so it can only be
    positive if one of them is. The candidate output rows / columns are those reading a positive
    input row / column; each edge of the box is then found by upsampling a few output lines at a
    time from that side inwards (the same arithmetic as the full upsampling, line by line), so a
    large mask costs four thin strips, not its whole area."""
    logits = np.asarray(mask_logits, dtype=np.float32)
    extent = _positive_extent(logits)
    if extent is None:
        return EMPTY_BOX.copy()
    rows, cols = extent
    (h, w), (out_h, out_w) = logits.shape, size
    wy, wx = bilinear_weights(h, out_h), bilinear_weights(w, out_w)
    first_y, last_y, lo_y, hi_y = _reach(h, out_h)
    first_x, last_x, lo_x, hi_x = _reach(w, out_w)
    r0, r1 = int(first_y[rows[0]]), int(last_y[rows[-1]])
    c0, c1 = int(first_x[cols[0]]), int(last_x[cols[-1]])

    def out_rows(a: int, b: int) -> np.ndarray:
        """Upsampled output rows a..b-1, columns c0..c1."""
        i0, i1 = int(lo_y[a]), int(hi_y[b - 1]) + 1
        j0, j1 = int(lo_x[c0]), int(hi_x[c1]) + 1
        return wy[a:b, i0:i1] @ (logits[i0:i1, j0:j1] @ wx[c0 : c1 + 1, j0:j1].T)

    def out_cols(a: int, b: int, top: int, bottom: int) -> np.ndarray:
        """Upsampled output columns a..b-1 (as rows), output rows top..bottom."""
        i0, i1 = int(lo_y[top]), int(hi_y[bottom]) + 1
        j0, j1 = int(lo_x[a]), int(hi_x[b - 1]) + 1
        return (wy[top : bottom + 1, i0:i1] @ (logits[i0:i1, j0:j1] @ wx[a:b, j0:j1].T)).T

    top = _first_positive_line(lambda a, b: out_rows(a, b), r0, r1, forward=True)
    if top is None:  # the positive pixels were too weak to survive the interpolation
        return EMPTY_BOX.copy()
    bottom = _first_positive_line(lambda a, b: out_rows(a, b), top, r1, forward=False)
    assert bottom is not None
    left = _first_positive_line(lambda a, b: out_cols(a, b, top, bottom), c0, c1, forward=True)
    right = _first_positive_line(lambda a, b: out_cols(a, b, top, bottom), c0, c1, forward=False)
    assert left is not None and right is not None
    return np.array([left, top, right, bottom], dtype=np.float64)


def _first_positive_line(lines, lo: int, hi: int, *, forward: bool, step: int = 8) -> int | None:
    """The first (forward) or last index in lo..hi whose line ``lines(a, b)`` (lines a..b-1, one
    per row of the result) holds a positive value, computing ``step`` lines at a time."""
    if forward:
        for a in range(lo, hi + 1, step):
            b = min(a + step, hi + 1)
            hits = np.flatnonzero((lines(a, b) > 0.0).any(axis=1))
            if hits.size:
                return a + int(hits[0])
    else:
        for b in range(hi + 1, lo, -step):
            a = max(b - step, lo)
            hits = np.flatnonzero((lines(a, b) > 0.0).any(axis=1))
            if hits.size:
                return a + int(hits[-1])
    return None


def is_empty_box(box: np.ndarray) -> bool:
    """The reference's "no box" test (``bbox == [0, 0, 0, 0]``)."""
    return not np.any(np.asarray(box))


def box_iou(box_a: np.ndarray, box_b: np.ndarray) -> float:
    """IoU of two xyxy boxes with areas (x2 - x1) * (y2 - y1), as the reference computes it:
    0 when ``box_b`` is the empty box or the union is 0."""
    if is_empty_box(box_b):
        return 0.0
    ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
    bx1, by1, bx2, by2 = (float(v) for v in box_b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union != 0 else 0.0


def box_ious(box: np.ndarray, boxes: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """IoU of ``box`` (e.g. the Kalman prediction) with each candidate box, float64 [N]."""
    return np.array([box_iou(box, b) for b in boxes], dtype=np.float64)


def xyxy_to_xyah(box: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] -> [cx, cy, a = w / h, h]; a zero height counts as 1 (so the empty box is [0, 0, 0, 1])."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if h == 0:
        h = 1.0
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, w / h, h], dtype=np.float64)


def xyah_to_xyxy(xyah: np.ndarray) -> np.ndarray:
    """[cx, cy, a, h] -> [x1, y1, x2, y2] (w = a * h)."""
    cx, cy, a, h = (float(v) for v in xyah[:4])
    return np.array([cx - a * h / 2, cy - h / 2, cx + a * h / 2, cy + h / 2], dtype=np.float64)
