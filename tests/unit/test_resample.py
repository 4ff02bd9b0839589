"""server/vision/resample.py: anti-aliased Lanczos-3, checked against Pillow's LANCZOS (the filter
of U^2-Netp's reference pre/post-processing)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from server.vision.resample import lanczos_resize

Image = pytest.importorskip("PIL.Image", reason="Pillow (the dev extra) is the reference")

IMAGES = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "images"


def _pillow(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS))


@pytest.mark.parametrize("photo", ["bus", "girl-1", "cloth-1"])
@pytest.mark.parametrize("size", [(320, 320), (64, 200), (1500, 900)])
def test_uint8_resize_matches_pillow_within_one_level(photo: str, size: tuple[int, int]) -> None:
    rgb = np.ascontiguousarray(cv2.imread(str(IMAGES / f"{photo}.jpg"))[..., ::-1])
    ours, theirs = lanczos_resize(rgb, size), _pillow(rgb, size)
    assert ours.shape == theirs.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    difference = np.abs(ours.astype(int) - theirs)
    # Pillow sums in fixed point, we in float32: a sum on the rounding edge may round the other way.
    assert difference.max() <= 1 and (difference > 0).mean() < 0.005


def test_float_matte_resize_is_lanczos_without_rounding() -> None:
    # A smooth matte inside 0.2..0.8: Pillow clips each pass to 0..255, so ringing past the ends
    # would differ by the clipping, not by the filter.
    y, x = np.mgrid[0:320, 0:320] / 320
    matte = (0.5 + 0.3 * np.sin(7 * x) * np.cos(5 * y)).astype(np.float32)
    up = lanczos_resize(matte, (600, 399))
    assert up.shape == (399, 600) and up.dtype == np.float32
    # The same filter as Pillow's on the 8-bit version, up to the 8-bit rounding.
    eight_bit = _pillow((matte * 255 + 0.5).astype(np.uint8), (600, 399)).astype(np.float32) / 255
    assert np.abs(up - eight_bit).max() < 2.5 / 255
    # A flat matte stays flat (weights sum to 1), at any size.
    np.testing.assert_allclose(lanczos_resize(np.full((320, 320), 0.25, np.float32), (37, 1000)), 0.25, atol=1e-6)


def test_shrinking_is_anti_aliased() -> None:
    # A one-pixel checkerboard averages to grey; a filter that does not widen aliases it.
    board = (np.indices((400, 400)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = lanczos_resize(board, (100, 100))
    assert np.abs(small.astype(int) - 128).max() <= 2


def test_same_size_is_a_copy_and_bad_sizes_are_refused() -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    same = lanczos_resize(pixels, (4, 2))
    np.testing.assert_array_equal(same, pixels)
    assert same is not pixels
    with pytest.raises(ValueError, match="positive"):
        lanczos_resize(pixels, (0, 2))
    with pytest.raises(ValueError, match="H x W"):
        lanczos_resize(np.zeros((0, 3), np.uint8), (2, 2))
