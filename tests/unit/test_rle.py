"""COCO RLE encoding agrees byte for byte with pycocotools, the reference users decode with."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from clients.masks import decode_rle
from framewise.v1 import common_pb2
from server.vision import rle


@pytest.mark.parametrize("seed", range(40))
def test_matches_pycocotools(seed: int) -> None:
    rng = np.random.default_rng(seed)
    height, width = rng.integers(1, 80, 2)
    mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
    if seed % 4 == 0:  # a blob, the usual shape of an object
        mask[:] = 0
        mask[height // 4 : height // 2 + 1, width // 3 : width // 3 * 2 + 1] = 1
    expected = coco_mask.encode(np.asfortranarray(mask))["counts"].decode()
    assert rle.encode(mask) == expected
    decoded = decode_rle(common_pb2.RleMask(height=int(height), width=int(width), counts=expected))
    np.testing.assert_array_equal(decoded, mask.astype(bool))


@pytest.mark.parametrize("fill", [0, 1])
def test_uniform_masks(fill: int) -> None:
    mask = np.full((720, 1280), fill, np.uint8)
    counts = rle.encode(mask)
    assert counts == coco_mask.encode(np.asfortranarray(mask))["counts"].decode()
    assert coco_mask.decode({"size": [720, 1280], "counts": counts}).sum() == mask.sum()


@pytest.mark.parametrize("seed", range(6))
def test_string_writers_agree(seed: int) -> None:
    """The per-count loop (short masks) and the vectorised writer (long ones) write the same bytes,
    also for counts whose difference to two back is negative or needs many 5-bit groups."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, [10, 1000, 10**6, 2**40][seed % 4], size=int(rng.integers(1, 600)))
    assert rle._to_string_loop(counts.tolist()) == rle._to_string_vectorised(counts)
