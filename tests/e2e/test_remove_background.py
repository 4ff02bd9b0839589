"""VisionService.RemoveBackground: image (or a crop) -> alpha or RGBA PNG, against the real Triton.

The CPU repository's `matting` model is the real U^2-Netp (S = 320): sizes, formats, labelling,
determinism and errors are checked here, and that the matte means something (the person of a
portrait is foreground, its corners background); tests/e2e/test_matting_faithfulness.py compares it
with the reference pre/post-processing.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from framewise.v1 import (
    common_pb2,
    info_service_pb2,
    info_service_pb2_grpc,
    vision_service_pb2,
    vision_service_pb2_grpc,
)
from tests.conftest import MATTING_IMAGE_SIZE, MAX_IMAGE_PIXELS, MAX_MESSAGE_BYTES, bad_request_fields

BUS = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "images" / "bus.jpg"
GIRL = BUS.with_name("girl-1.jpg")  # 600x399, one person in the middle, arms raised
BUS_SIZE = (810, 1080)  # width, height
ALPHA = vision_service_pb2.MATTE_FORMAT_ALPHA_PNG
RGBA = vision_service_pb2.MATTE_FORMAT_RGBA_PNG


@pytest.fixture(scope="module")
def vision(channel: grpc.Channel) -> vision_service_pb2_grpc.VisionServiceStub:
    return vision_service_pb2_grpc.VisionServiceStub(channel)


def _bus() -> common_pb2.Image:
    return common_pb2.Image(encoded=BUS.read_bytes())


def _remove(vision, image: common_pb2.Image | None = None, **fields) -> vision_service_pb2.RemoveBackgroundResponse:
    request = vision_service_pb2.RemoveBackgroundRequest(image=image or _bus(), **fields)
    return vision.RemoveBackground(request, timeout=60)


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None and pixels.dtype == np.uint8
    return pixels


def test_rgba_cut_out_of_the_whole_image_is_the_default(vision) -> None:
    response = _remove(vision)
    width, height = BUS_SIZE
    assert (response.width, response.height) == (width, height)
    bgra = _decode_png(response.png)
    assert bgra.shape == (height, width, 4)
    # The colour channels are the input pixels untouched; only alpha is new.
    np.testing.assert_array_equal(bgra[..., :3], cv2.imread(str(BUS)))
    alpha = bgra[..., 3]
    assert alpha.std() > 20 and alpha.min() < 32 and alpha.max() > 224, "the matte should vary across the image"
    assert response.model.name == "matting" and response.model.version == "1"
    assert not response.model.stand_in and response.model.network == "U2-Netp"
    assert response.timings.triton_ms > 0 and response.timings.total_ms >= response.timings.triton_ms


def test_alpha_png_of_a_crop_has_the_crop_size(vision) -> None:
    crop = common_pb2.BoundingBox(x1=100.5, y1=200, x2=500, y2=700.25)
    response = _remove(vision, crop=crop, format=ALPHA)
    # Fractional corners round outwards: x 100..500, y 200..701.
    assert (response.width, response.height) == (400, 501)
    alpha = _decode_png(response.png)
    assert alpha.shape == (501, 400) and alpha.std() > 10
    # The RGBA answer for the same crop carries the same matte and the crop's pixels.
    rgba = _decode_png(_remove(vision, crop=crop, format=RGBA).png)
    np.testing.assert_array_equal(rgba[..., 3], alpha)
    np.testing.assert_array_equal(rgba[..., :3], cv2.imread(str(BUS))[200:701, 100:500])


def test_same_input_gives_the_same_bytes(vision) -> None:
    crop = common_pb2.BoundingBox(x1=0, y1=0, x2=810, y2=540)
    first = _remove(vision, crop=crop, format=ALPHA).png
    assert _remove(vision, crop=crop, format=ALPHA).png == first
    assert _remove(vision).png == _remove(vision).png


def test_raw_frame_matches_encoded_image(vision) -> None:
    rgb = np.ascontiguousarray(cv2.imread(str(BUS))[..., ::-1])
    raw = common_pb2.Image(
        raw=common_pb2.RawFrame(width=810, height=1080, pixel_format=common_pb2.PIXEL_FORMAT_RGB8, data=rgb.tobytes())
    )
    assert _remove(vision, raw, format=ALPHA).png == _remove(vision, format=ALPHA).png


def test_small_image_is_upsampled_for_the_model_and_back(vision) -> None:
    small = cv2.imencode(".png", cv2.resize(cv2.imread(str(BUS)), (60, 80)))[1].tobytes()
    assert 60 < MATTING_IMAGE_SIZE
    response = _remove(vision, common_pb2.Image(encoded=small), format=ALPHA)
    assert _decode_png(response.png).shape == (80, 60)


def test_the_person_of_a_portrait_is_foreground(vision) -> None:
    response = _remove(vision, common_pb2.Image(encoded=GIRL.read_bytes()), format=ALPHA)
    alpha = _decode_png(response.png).astype(np.float32) / 255
    assert alpha.shape == (399, 600)
    assert alpha[250:330, 200:260].mean() > 0.9  # her torso (white T-shirt)
    for corner in (alpha[:60, :60], alpha[:60, -60:], alpha[-60:, :60], alpha[-60:, -60:]):  # sky, mountains
        assert corner.max() < 0.05
    assert 0.03 < (alpha > 0.5).mean() < 0.3  # a person, not the whole picture


def test_server_info_lists_matting_as_the_real_u2netp(channel: grpc.Channel) -> None:
    info = info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(
        info_service_pb2.GetServerInfoRequest(), timeout=5
    )
    (matting,) = [m for m in info.models if m.name == "matting"]
    assert matting.ready and matting.required and not matting.stand_in and matting.network == "U2-Netp"
    assert matting.source.startswith("u2netp.onnx sha256:")
    size = MATTING_IMAGE_SIZE
    assert [(t.name, t.datatype, list(t.shape)) for t in matting.inputs] == [("image", "UINT8", [-1, size, size, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in matting.outputs] == [("alpha", "FP32", [-1, 1, size, size])]


def _corrupt_jpeg() -> bytes:
    data = bytearray(BUS.read_bytes())
    data[600:-2] = np.random.default_rng(1).integers(0, 255, len(data) - 602, dtype=np.uint8).tobytes()
    return bytes(data)


def _box(x1: float, y1: float, x2: float, y2: float) -> common_pb2.BoundingBox:
    return common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)


# (case id, request fields, words the message must contain, field named in BadRequest)
BAD = [
    ("crop outside", {"crop": _box(10, 10, 900, 50)}, "not inside the 810x1080 image", "crop"),
    ("crop negative corner", {"crop": _box(-1, 10, 100, 50)}, "not inside the 810x1080 image", "crop"),
    ("crop zero area", {"crop": _box(10, 10, 10, 50)}, "zero or negative area", "crop"),
    ("crop inverted", {"crop": _box(100, 100, 50, 200)}, "zero or negative area", "crop"),
    ("crop NaN", {"crop": _box(math.nan, 10, 100, 50)}, "not a finite number", "crop"),
    ("unknown format", {"format": 7}, "not a MatteFormat", "format"),
    ("corrupt image", {"image": common_pb2.Image(encoded=_corrupt_jpeg())}, "JPEG", "image.encoded"),
    ("not an image", {"image": common_pb2.Image(encoded=b"%PDF-1.7")}, "not a supported image", "image.encoded"),
    ("no image", {"image": common_pb2.Image()}, "image is empty", "image"),
]


@pytest.mark.parametrize(("fields", "words", "field"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_rejected_and_the_server_keeps_serving(vision, fields: dict, words: str, field: str) -> None:
    request = vision_service_pb2.RemoveBackgroundRequest(**fields)
    if "image" not in fields:
        request.image.CopyFrom(_bus())
    with pytest.raises(grpc.RpcError) as info:
        vision.RemoveBackground(request, timeout=30)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert words in error.details()
    violations = bad_request_fields(error)
    assert violations is not None, "no google.rpc.Status in the trailers"
    assert violations == [field]
    # The next request is answered normally.
    response = _remove(vision, crop=_box(0, 0, 64, 64), format=ALPHA)
    assert (response.width, response.height) == (64, 64)


def test_png_over_the_message_limit_is_refused_clearly(vision) -> None:
    # 1700x1700 (under the test pixel limit) of JPEG noise: a small request, but its RGBA PNG is
    # about 9 MB, over the test server's 4 MiB message limit.
    noise = np.random.default_rng(3).integers(0, 255, (1700, 1700, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 30])[1].tobytes()
    assert 1700 * 1700 <= MAX_IMAGE_PIXELS and len(jpeg) < MAX_MESSAGE_BYTES
    with pytest.raises(grpc.RpcError) as info:
        _remove(vision, common_pb2.Image(encoded=jpeg))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "message limit" in info.value.details() and "crop" in info.value.details()
    # The alpha matte alone of the same image fits.
    assert _remove(vision, common_pb2.Image(encoded=jpeg), format=ALPHA).width == 1700
