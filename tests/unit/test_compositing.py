"""Pure compositing maths, no server: colours, cover/contain fits, feathering, alpha blending."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from server.vision.compositing import (
    BackgroundMode,
    BackgroundSpec,
    Fit,
    composite,
    encode_png,
    feather,
    fit_background,
    parse_color,
    render,
)


@pytest.mark.parametrize(
    ("text", "rgb"),
    [
        ("#FF8000", (255, 128, 0)),
        ("#ff8000", (255, 128, 0)),
        ("#f80", (255, 136, 0)),
        ("  #0A0b0C ", (10, 11, 12)),
        ("white", (255, 255, 255)),
        ("Green", (0, 128, 0)),
        ("LIME", (0, 255, 0)),
        ("grey", (128, 128, 128)),
        ("gray", (128, 128, 128)),
        ("navy", (0, 0, 128)),
    ],
)
def test_parse_color_accepts_hex_and_css_names(text: str, rgb: tuple[int, int, int]) -> None:
    assert parse_color(text) == rgb


@pytest.mark.parametrize("text", ["", "#", "#12", "#1234", "#12345", "#1234567", "#GGGGGG", "FF8000", "rgb(1,2,3)", "chartreuse", "#fff#"])
def test_parse_color_refuses_anything_else_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_color(text)
    message = str(error.value)
    assert "#RRGGBB" in message and "#RGB" in message and "white" in message


def test_parse_color_bounds_the_echoed_text() -> None:
    with pytest.raises(ValueError) as error:
        parse_color("x" * 100_000)
    assert len(str(error.value)) < 400 and "100000 characters" in str(error.value)


def _gradient(height: int, width: int) -> np.ndarray:
    """R encodes the column, G the row (scaled to 0..255), B constant: position is readable."""
    xs = np.linspace(0, 255, width).round().astype(np.uint8)
    ys = np.linspace(0, 255, height).round().astype(np.uint8)
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = xs[None, :]
    image[..., 1] = ys[:, None]
    image[..., 2] = 77
    return image


@pytest.mark.parametrize(("src", "frame"), [((100, 400), (200, 200)), ((400, 100), (200, 200)), ((300, 300), (150, 90)), ((90, 160), (1080, 1920)), ((50, 50), (50, 50))])
def test_cover_fills_the_frame_centred(src: tuple[int, int], frame: tuple[int, int]) -> None:
    image = _gradient(*src)
    out = fit_background(image, frame[1], frame[0], Fit.COVER)
    assert out.shape == (*frame, 3) and out.dtype == np.uint8
    # Centred: the middle of the frame shows the middle of the picture (R and G near 128).
    middle = out[frame[0] // 2, frame[1] // 2].astype(int)
    assert abs(middle[0] - 128) <= 4 and abs(middle[1] - 128) <= 4 and middle[2] == 77
    # No bars anywhere: B is the picture's constant everywhere.
    assert (out[..., 2] == 77).all()


def test_cover_of_a_wide_picture_crops_its_sides_only() -> None:
    image = _gradient(100, 400)  # 4:1 into 1:1: scaled x2, 800 wide, 300 cut from each side
    out = fit_background(image, 200, 200, Fit.COVER)
    # All rows are kept (G spans 0..255), only the middle quarter of the columns (R ~ 96..159).
    assert out[0, 100, 1] <= 2 and out[-1, 100, 1] >= 253
    assert 90 <= out[100, 0, 0] <= 100 and 155 <= out[100, -1, 0] <= 165


def test_contain_of_a_wide_picture_has_bars_top_and_bottom() -> None:
    image = _gradient(100, 400)  # 4:1 into 200x200: 200x50, bars of 75 rows above and below
    out = fit_background(image, 200, 200, Fit.CONTAIN, (1, 2, 3))
    assert out.shape == (200, 200, 3)
    assert (out[:75] == (1, 2, 3)).all() and (out[125:] == (1, 2, 3)).all()
    assert (out[75:125, :, 2] == 77).all()
    # The whole picture is visible: left edge dark, right edge bright.
    assert out[100, 0, 0] <= 3 and out[100, -1, 0] >= 252


def test_contain_of_a_tall_picture_has_bars_left_and_right() -> None:
    image = _gradient(300, 100)  # 1:3 into 120 wide x 90 high: 30x90, bars of 45 columns
    out = fit_background(image, 120, 90, Fit.CONTAIN, (9, 9, 9))
    assert (out[:, :45] == 9).all() and (out[:, 75:] == 9).all()
    assert (out[:, 45:75, 2] == 77).all()
    assert out[0, 60, 1] <= 3 and out[-1, 60, 1] >= 252


def test_contain_puts_the_odd_pixel_right() -> None:
    out = fit_background(np.full((10, 10, 3), 200, np.uint8), 13, 10, Fit.CONTAIN, (0, 0, 0))
    assert (out[:, :1] == 0).all() and (out[:, 1:11] == 200).all() and (out[:, 11:] == 0).all()


def test_composite_is_exact_at_the_ends_and_rounds_in_between() -> None:
    fg = np.array([[[200, 100, 0], [200, 100, 0], [200, 100, 0], [255, 255, 255]]], np.uint8)
    bg = np.array([[[0, 50, 255], [0, 50, 255], [0, 50, 255], [0, 0, 0]]], np.uint8)
    alpha = np.array([[255, 0, 128, 1]], np.uint8)
    out = composite(fg, alpha, bg)
    assert out[0, 0].tolist() == [200, 100, 0]
    assert out[0, 1].tolist() == [0, 50, 255]
    # 200*128/255 = 100.39 -> 100; (100*128 + 50*127)/255 = 75.10 -> 75; 255*127/255 = 127.
    assert out[0, 2].tolist() == [100, 75, 127]
    assert out[0, 3].tolist() == [1, 1, 1]  # 255 * 1 / 255


def test_composite_matches_float_rounding_everywhere() -> None:
    rng = np.random.default_rng(7)
    fg, bg = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    a = alpha[..., None].astype(np.float64) / 255
    expected = np.floor(fg * a + bg * (1 - a) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(composite(fg, alpha, bg), expected)


def test_composite_refuses_mismatched_sizes() -> None:
    with pytest.raises(ValueError):
        composite(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), np.zeros((4, 4, 3), np.uint8))


def test_feather_softens_the_edge_and_keeps_far_pixels() -> None:
    alpha = np.zeros((100, 100), np.uint8)
    alpha[30:70, 30:70] = 255
    assert feather(alpha, 0) is alpha
    soft = feather(alpha, 6)
    assert soft.dtype == np.uint8 and soft.shape == alpha.shape
    # Far from the edge (more than the radius): exactly the original 0 and 255.
    assert (soft[37:63, 37:63] == 255).all()
    assert (soft[:23] == 0).all() and (soft[:, 77:] == 0).all()
    # On the edge: a middle value, and a ramp rising inwards.
    assert 90 <= soft[50, 30] <= 165
    assert soft[50, 26] < soft[50, 28] < soft[50, 30] < soft[50, 32] < soft[50, 34]


def test_feather_keeps_a_subject_cut_by_the_frame_opaque_at_the_border() -> None:
    alpha = np.zeros((50, 50), np.uint8)
    alpha[25:, 10:40] = 255  # shoulders running out of the bottom of the frame
    soft = feather(alpha, 5)
    assert (soft[-1, 16:34] == 255).all()


def test_feather_refuses_a_negative_radius() -> None:
    with pytest.raises(ValueError):
        feather(np.zeros((4, 4), np.uint8), -1)


def _subject() -> tuple[np.ndarray, np.ndarray]:
    rgb = np.full((40, 60, 3), (10, 200, 30), np.uint8)
    alpha = np.zeros((40, 60), np.uint8)
    alpha[10:30, 20:40] = 255
    return rgb, alpha


def test_render_transparent_is_the_rgba_cut_out() -> None:
    rgb, alpha = _subject()
    out = render(rgb, alpha, BackgroundSpec(BackgroundMode.TRANSPARENT))
    assert out.shape == (40, 60, 4)
    np.testing.assert_array_equal(out[..., :3], rgb)
    np.testing.assert_array_equal(out[..., 3], alpha)


def test_render_colour_and_keep() -> None:
    rgb, alpha = _subject()
    out = render(rgb, alpha, BackgroundSpec(BackgroundMode.COLOR, color=(255, 0, 255)))
    assert out.shape == (40, 60, 3)
    assert out[0, 0].tolist() == [255, 0, 255] and out[20, 30].tolist() == [10, 200, 30]
    assert render(rgb, alpha, BackgroundSpec(BackgroundMode.KEEP)) is rgb


def test_render_image_uses_the_fit_and_bar_colour() -> None:
    rgb, alpha = _subject()
    picture = np.full((10, 10, 3), 50, np.uint8)  # square into 60x40: contain leaves side bars
    out = render(rgb, alpha, BackgroundSpec(BackgroundMode.IMAGE, color=(0, 0, 255), image=picture, fit=Fit.CONTAIN))
    assert out[20, 0].tolist() == [0, 0, 255] and out[20, 15].tolist() == [50, 50, 50]
    assert out[20, 30].tolist() == [10, 200, 30]
    covered = render(rgb, alpha, BackgroundSpec(BackgroundMode.IMAGE, image=picture, fit=Fit.COVER))
    assert covered[20, 0].tolist() == [50, 50, 50]


def test_an_image_background_needs_an_image() -> None:
    with pytest.raises(ValueError):
        BackgroundSpec(BackgroundMode.IMAGE)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_encode_png_round_trips_in_rgb_order(channels: int) -> None:
    rng = np.random.default_rng(channels)
    shape = (7, 9) if channels == 1 else (7, 9, channels)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    back = cv2.imdecode(np.frombuffer(encode_png(pixels), np.uint8), cv2.IMREAD_UNCHANGED)
    if channels == 3:
        back = cv2.cvtColor(back, cv2.COLOR_BGR2RGB)
    elif channels == 4:
        back = cv2.cvtColor(back, cv2.COLOR_BGRA2RGBA)
    np.testing.assert_array_equal(back, pixels)
