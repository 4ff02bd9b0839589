"""Binary masks as COCO run-length encoding (the compressed string pycocotools reads).

Clients decode with pycocotools or clients.masks.decode_rle.

Runs are counted in column-major order, starting with background; the counts are written with
pycocotools' 6-bit variable-length code (rleToString), each count after the second as the
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
    bounds = np.concatenate(([0], changes, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:  # the first run is background by convention, even when empty
        counts.insert(0, 0)
    return _to_string(counts)


def _to_string(counts: list[int]) -> str:
    out = bytearray()
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences keep their sign
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(c + 48)
    return out.decode("ascii")
