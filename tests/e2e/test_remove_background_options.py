"""RemoveBackground's options through the real server and Triton: every background mode
(transparent, colour, image cover/contain, keep, alpha only), feathering, crop_person, and the
bad input each option can bring.

Compositing is checked against the server's own matte (asked for separately: the same image
gives the same matte), so those checks hold whatever the model; the checks marked "a real
matte" hold for a real person matte (the person's centre opaque, the sky transparent).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc
from tests.conftest import ASSETS, bad_request_fields

GIRL = ASSETS / "images" / "girl-1.jpg"  # 600x399: one person, arms up, sky and mountains behind
ZIDANE = ASSETS / "images" / "zidane.jpg"  # 1280x720: two persons
GIRL_TORSO = (225, 290)  # x, y: the middle of her T-shirt
ALPHA = vision_service_pb2.MATTE_FORMAT_ALPHA_PNG
B = common_pb2
RED, BLUE, BAR = (255, 0, 0), (0, 0, 255), (10, 200, 30)


@pytest.fixture(scope="module")
def vision(channel: grpc.Channel) -> vision_service_pb2_grpc.VisionServiceStub:
    return vision_service_pb2_grpc.VisionServiceStub(channel)


def _image(path: Path) -> common_pb2.Image:
    return common_pb2.Image(encoded=path.read_bytes())


def _rgb(path: Path) -> np.ndarray:
    return cv2.imread(str(path))[..., ::-1]


def _remove(vision, path: Path = GIRL, **fields) -> vision_service_pb2.RemoveBackgroundResponse:  # noqa: ANN001
    request = vision_service_pb2.RemoveBackgroundRequest(image=_image(path), **fields)
    return vision.RemoveBackground(request, timeout=120)


def _png(data: bytes) -> np.ndarray:
    """PNG bytes -> pixels in RGB(A) order (grayscale stays 2-D)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return pixels


def _blend(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The expected composite, in floating point, rounded to nearest."""
    a = alpha.astype(np.float64)[..., None] / 255
    return np.floor(fg * a + bg * (1 - a) + 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def girl_alpha(vision) -> np.ndarray:  # noqa: ANN001
    response = _remove(vision, format=ALPHA)
    assert response.channels == 1 and response.background_mode == B.BACKGROUND_MODE_UNSPECIFIED
    # The "real matte" checks below need a real network, and the answer must say which one.
    assert not response.model.stand_in and response.model.network not in ("", "stand-in")
    alpha = _png(response.png)
    assert alpha.shape == (399, 600)
    return alpha


def test_a_real_matte_of_the_girl(girl_alpha: np.ndarray) -> None:
    # A real matte: her torso is opaque, the sky in both top corners transparent.
    x, y = GIRL_TORSO
    assert girl_alpha[y - 5 : y + 5, x - 5 : x + 5].min() > 200
    assert girl_alpha[:20, :20].max() < 30 and girl_alpha[:20, -20:].max() < 30


def test_transparent_is_the_default_cut_out(vision, girl_alpha: np.ndarray) -> None:  # noqa: ANN001
    response = _remove(vision)
    assert response.background_mode == B.BACKGROUND_MODE_TRANSPARENT and response.channels == 4
    assert (response.width, response.height) == (600, 399)
    assert [response.output_box.x1, response.output_box.y1, response.output_box.x2, response.output_box.y2] == [0, 0, 600, 399]
    rgba = _png(response.png)
    np.testing.assert_array_equal(rgba[..., :3], _rgb(GIRL))
    np.testing.assert_array_equal(rgba[..., 3], girl_alpha)
    explicit = _remove(vision, background=B.Background(mode=B.BACKGROUND_MODE_TRANSPARENT))
    assert explicit.png == response.png
    assert response.model.name and not response.HasField("person_box")


def test_colour_background(vision, girl_alpha: np.ndarray) -> None:  # noqa: ANN001
    response = _remove(vision, background=B.Background(mode=B.BACKGROUND_MODE_COLOR, color="#0F0"))
    assert response.background_mode == B.BACKGROUND_MODE_COLOR and response.channels == 3
    out = _png(response.png)
    assert out.shape == (399, 600, 3)
    green = np.zeros_like(out)
    green[..., 1] = 255
    np.testing.assert_array_equal(out, _blend(_rgb(GIRL), girl_alpha, green))
    # A real matte: the sky corner is (nearly) the new colour, her torso keeps its pixels.
    assert np.abs(out[2, 2].astype(int) - (0, 255, 0)).max() <= 30
    x, y = GIRL_TORSO
    assert np.abs(out[y, x].astype(int) - _rgb(GIRL)[y, x]).max() <= 50
    named = _remove(vision, background=B.Background(mode=B.BACKGROUND_MODE_COLOR, color=" Lime "))
    assert named.png == response.png


def _halves(width: int, height: int) -> bytes:
    """A picture whose left half is red and right half blue (PNG, lossless)."""
    picture = np.zeros((height, width, 3), np.uint8)
    picture[:, : width // 2] = RED
    picture[:, width // 2 :] = BLUE
    return cv2.imencode(".png", picture[..., ::-1])[1].tobytes()


def _image_background(fit: int, color: str = "") -> common_pb2.Background:
    return B.Background(mode=B.BACKGROUND_MODE_IMAGE, image=B.Image(encoded=_halves(800, 200)), fit=fit, color=color)


def test_image_background_cover(vision, girl_alpha: np.ndarray) -> None:  # noqa: ANN001
    # 800x200 (4:1) covering 600x399: scaled to 1596x399, 498 columns cut from each side, so the
    # red/blue border lands at column 300 and there are no bars.
    response = _remove(vision, background=_image_background(B.BACKGROUND_FIT_COVER))
    assert response.background_mode == B.BACKGROUND_MODE_IMAGE and response.channels == 3
    out = _png(response.png)
    expected_bg = np.empty_like(out)
    expected_bg[:, :300], expected_bg[:, 300:] = RED, BLUE
    keep = np.ones(out.shape[:2], bool)
    keep[:, 297:303] = False  # the resampled border
    np.testing.assert_array_equal(out[keep], _blend(_rgb(GIRL), girl_alpha, expected_bg)[keep])
    # Unset fit is cover.
    assert _remove(vision, background=_image_background(B.BACKGROUND_FIT_UNSPECIFIED)).png == response.png


def test_image_background_contain_with_bars(vision, girl_alpha: np.ndarray) -> None:  # noqa: ANN001
    # 800x200 inside 600x399: scaled to 600x150 at rows 124..273, bars above and below.
    response = _remove(vision, background=_image_background(B.BACKGROUND_FIT_CONTAIN, "#0AC81E"))
    out = _png(response.png)
    expected_bg = np.empty_like(out)
    expected_bg[:] = BAR
    expected_bg[124:274, :300], expected_bg[124:274, 300:] = RED, BLUE
    keep = np.ones(out.shape[:2], bool)
    keep[:, 298:302] = keep[122:127] = keep[271:276] = False  # resampled borders
    np.testing.assert_array_equal(out[keep], _blend(_rgb(GIRL), girl_alpha, expected_bg)[keep])
    # A real matte: the top-left corner is sky, so it shows the bar colour.
    assert np.abs(out[2, 2].astype(int) - BAR).max() <= 30
    # Bars are black without a colour.
    black = _png(_remove(vision, background=_image_background(B.BACKGROUND_FIT_CONTAIN)).png)
    assert np.abs(black[2, 2].astype(int)).max() <= 30


def test_feather_softens_only_near_edges(vision, girl_alpha: np.ndarray) -> None:  # noqa: ANN001
    radius = 8
    response = _remove(vision, format=ALPHA, feather_px=radius)
    soft = _png(response.png)
    window = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    # Pixels whose whole neighbourhood is opaque (or transparent) stay exactly so; the image
    # border is replicated, so it does not count as an edge.
    inner = cv2.erode(girl_alpha, window, borderType=cv2.BORDER_REPLICATE) == 255
    outer = cv2.dilate(girl_alpha, window, borderType=cv2.BORDER_REPLICATE) == 0
    assert (soft[inner] == 255).all() and (soft[outer] == 0).all()
    assert not np.array_equal(soft, girl_alpha)
    # Edges got wider: more partly transparent pixels than in the model's matte.
    partial = lambda a: int(((a > 10) & (a < 245)).sum())  # noqa: E731
    assert partial(soft) > partial(girl_alpha)
    # The feathered matte is the one composited.
    cut = _png(_remove(vision, feather_px=radius).png)
    np.testing.assert_array_equal(cut[..., 3], soft)


def _detected_persons(channel: grpc.Channel) -> list[tuple[float, float, float, float]]:
    detect = vision_service_pb2_grpc.VisionServiceStub(channel).Detect(
        vision_service_pb2.DetectRequest(image=_image(ZIDANE)), timeout=60
    )
    return [(d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in detect.detections]


def _grown(box: tuple[float, float, float, float], width: int, height: int) -> list[int]:
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * 0.15, (y2 - y1) * 0.15
    return [max(0, int(np.floor(x1 - mx))), max(0, int(np.floor(y1 - my))), min(width, int(np.ceil(x2 + mx))), min(height, int(np.ceil(y2 + my)))]


def test_crop_person_takes_the_largest_person(vision, channel: grpc.Channel) -> None:  # noqa: ANN001
    persons = _detected_persons(channel)
    assert len(persons) >= 2
    largest = max(persons, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    response = _remove(vision, ZIDANE, crop_person=True)
    got = (response.person_box.x1, response.person_box.y1, response.person_box.x2, response.person_box.y2)
    assert got == pytest.approx(largest, abs=1e-3)
    assert response.persons_found == len(persons) and response.detection_model.name == "yolov8"
    x1, y1, x2, y2 = _grown(largest, 1280, 720)
    assert [response.output_box.x1, response.output_box.y1, response.output_box.x2, response.output_box.y2] == [x1, y1, x2, y2]
    assert (response.width, response.height) == (x2 - x1, y2 - y1)
    rgba = _png(response.png)
    assert rgba.shape == (y2 - y1, x2 - x1, 4)
    np.testing.assert_array_equal(rgba[..., :3], _rgb(ZIDANE)[y1:y2, x1:x2])
    # A real matte: the middle of the person's box (his chest) is opaque.
    cx, cy = int((largest[0] + largest[2]) / 2) - x1, int((largest[1] + largest[3]) / 2) - y1
    assert rgba[cy - 3 : cy + 3, cx - 3 : cx + 3, 3].min() > 200


def test_crop_person_by_index_with_a_colour(vision, channel: grpc.Channel) -> None:  # noqa: ANN001
    persons = _detected_persons(channel)  # highest score first, as person_index counts
    response = _remove(
        vision, ZIDANE, crop_person=True, person_index=1, background=B.Background(mode=B.BACKGROUND_MODE_COLOR, color="white")
    )
    assert response.person_index == 1
    got = (response.person_box.x1, response.person_box.y1, response.person_box.x2, response.person_box.y2)
    assert got == pytest.approx(persons[1], abs=1e-3)
    x1, y1, x2, y2 = _grown(persons[1], 1280, 720)
    assert _png(response.png).shape == (y2 - y1, x2 - x1, 3)


def test_keep_with_crop_person_is_the_untouched_crop_and_runs_no_matting(vision) -> None:  # noqa: ANN001
    response = _remove(vision, ZIDANE, crop_person=True, background=B.Background(mode=B.BACKGROUND_MODE_KEEP))
    assert response.background_mode == B.BACKGROUND_MODE_KEEP and response.channels == 3
    assert not response.HasField("model") and response.timings.triton_ms > 0  # the detector's
    box = response.output_box
    np.testing.assert_array_equal(_png(response.png), _rgb(ZIDANE)[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)])


def test_no_person_is_a_failed_precondition(vision) -> None:  # noqa: ANN001
    sky = cv2.imencode(".png", np.full((240, 320, 3), (235, 206, 135), np.uint8))[1].tobytes()
    request = vision_service_pb2.RemoveBackgroundRequest(image=B.Image(encoded=sky), crop_person=True)
    with pytest.raises(grpc.RpcError) as info:
        vision.RemoveBackground(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no person found" in info.value.details() and "crop_person" in info.value.details()


def _color(text: str, mode: int = B.BACKGROUND_MODE_COLOR) -> common_pb2.Background:
    return B.Background(mode=mode, color=text)


# (case id, request fields, words the message must contain, field named in BadRequest)
BAD = [
    ("background not an image",
     {"background": B.Background(mode=B.BACKGROUND_MODE_IMAGE, image=B.Image(encoded=b"this is not a picture"))},
     "not a supported image", "background.image.encoded"),
    ("background truncated jpeg",
     {"background": B.Background(mode=B.BACKGROUND_MODE_IMAGE, image=B.Image(encoded=GIRL.read_bytes()[:5000]))},
     "truncated", "background.image.encoded"),
    ("background image missing", {"background": B.Background(mode=B.BACKGROUND_MODE_IMAGE)}, "required", "background.image"),
    ("background upload id", {"background": B.Background(mode=B.BACKGROUND_MODE_IMAGE, image_upload_id="abc")},
     "jobs only", "background.image_upload_id"),
    ("picture without image mode", {"background": B.Background(image=B.Image(encoded=_halves(8, 8)))},
     "BACKGROUND_MODE_IMAGE", "background.image"),
    ("colour not a colour", {"background": _color("blurple")}, "not a colour", "background.color"),
    ("colour bad hex", {"background": _color("#12345")}, "#RRGGBB", "background.color"),
    ("colour huge", {"background": _color("x" * 100_000)}, "100000 characters", "background.color"),
    ("colour missing", {"background": _color("")}, "required", "background.color"),
    ("colour with transparent", {"background": _color("red", B.BACKGROUND_MODE_TRANSPARENT)}, "BACKGROUND_MODE_TRANSPARENT", "background.color"),
    ("bad bar colour", {"background": _image_background(B.BACKGROUND_FIT_CONTAIN, "nope")}, "not a colour", "background.color"),
    ("unknown mode", {"background": B.Background(mode=42)}, "not a BackgroundMode", "background.mode"),
    ("unknown fit", {"background": B.Background(mode=B.BACKGROUND_MODE_IMAGE, image=B.Image(encoded=_halves(8, 8)), fit=9)},
     "not a BackgroundFit", "background.fit"),
    ("alpha with background", {"format": ALPHA, "background": _color("white")}, "MATTE_FORMAT_ALPHA_PNG", "background"),
    ("feather too big", {"feather_px": 65.0}, "[0, 64]", "feather_px"),
    ("feather negative", {"feather_px": -1.0}, "[0, 64]", "feather_px"),
    ("feather nan", {"feather_px": float("nan")}, "[0, 64]", "feather_px"),
    ("feather with keep", {"feather_px": 3.0, "background": B.Background(mode=B.BACKGROUND_MODE_KEEP)}, "KEEP", "feather_px"),
    ("crop and crop_person", {"crop_person": True, "crop": B.BoundingBox(x1=0, y1=0, x2=10, y2=10)}, "cannot be combined", "crop"),
    ("index without crop_person", {"person_index": 0}, "crop_person", "person_index"),
    ("index out of range", {"crop_person": True, "person_index": 99}, "person_index is 99", "person_index"),
    ("negative index", {"crop_person": True, "person_index": -1}, "person_index is -1", "person_index"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "words", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_and_the_server_keeps_serving(vision, fields: dict, words: str, field: str) -> None:  # noqa: ANN001
    request = vision_service_pb2.RemoveBackgroundRequest(image=_image(ZIDANE), **fields)
    with pytest.raises(grpc.RpcError) as info:
        vision.RemoveBackground(request, timeout=60)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert words in error.details() and len(error.details()) < 1000
    assert bad_request_fields(error) == [field]
    small = _remove(vision, crop=B.BoundingBox(x1=0, y1=0, x2=32, y2=32), format=ALPHA)
    assert (small.width, small.height) == (32, 32)
