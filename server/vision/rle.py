"""Binary masks as COCO run-length encoding (the compressed string pycocotools reads).

Clients decode with pycocotools or clients.masks.decode_rle.

Runs are counted in column-major order, starting with background; the counts are written with
pycocotools' 6-bit variable-length code (rleToString), each count from the fourth on as the
difference to the count two places back.
"""

from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> str:
    """HxW bool/0-1 mask -> COCO compressed RLE counts string."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return ""
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size])))
    if flat[0]:  # the first run is background by convention, even when empty
        counts = np.concatenate(([0], counts))
    return _to_string(counts)


def _to_string(counts: np.ndarray) -> str:
    """pycocotools' rleToString, vectorised: 5 bits per character, 0x20 = "more follows"."""
    runs = np.asarray(counts, dtype=np.int64)
    x = runs.copy()
    x[3:] -= runs[1:-2]  # every count after the third is stored as the difference to two back
    chars = np.zeros((x.size, 13), dtype=np.uint8)  # 13 x 5 bits covers any int64
    active = np.ones(x.size, dtype=bool)
    length = np.zeros(x.size, dtype=np.int64)
    for k in range(chars.shape[1]):
        c = x & 0x1F
        x = x >> 5  # arithmetic shift: negative differences keep their sign
        more = np.where(c & 0x10, x != -1, x != 0) & active
        chars[:, k] = np.where(active, (c | (more.astype(np.int64) << 5)) + 48, 0)
        length += active
        active = more
        if not active.any():
            break
    mask = np.arange(chars.shape[1])[None, :] < length[:, None]
    return chars[mask].tobytes().decode("ascii")
