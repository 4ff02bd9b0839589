"""Every bad input gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED with an actionable message, the
field named in google.rpc.BadRequest, and the server answers the next request normally."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc
from tests.conftest import MAX_IMAGE_PIXELS, MAX_MESSAGE_BYTES, bad_request_fields

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
BUS = Path(__file__).resolve().parents[2].parent / "shared" / "assets" / "images" / "bus.jpg"


def _bus() -> bytes:
    return BUS.read_bytes()


def _png(height: int, width: int) -> bytes:
    return cv2.imencode(".png", np.zeros((height, width), np.uint8))[1].tobytes()


def _raw(width: int, height: int, data_len: int | None = None, fmt: int = common_pb2.PIXEL_FORMAT_RGB8) -> common_pb2.Image:
    size = width * height * 3 if data_len is None else data_len
    return common_pb2.Image(raw=common_pb2.RawFrame(width=width, height=height, pixel_format=fmt, data=b"\0" * max(size, 0)))


def _tiff_header(width: int, height: int) -> bytes:
    """A TIFF of a few dozen bytes whose first directory declares width x height (no pixel data)."""
    entries = struct.pack("<HHII", 256, 4, 1, width) + struct.pack("<HHII", 257, 4, 1, height)
    return b"II*\x00" + struct.pack("<IH", 8, 2) + entries + struct.pack("<I", 0)


def _corrupt_jpeg() -> bytes:
    # A real JPEG header followed by noise where the entropy-coded data should be, and an EOI.
    data = bytearray(_bus())
    rng = np.random.default_rng(1)
    data[600:-2] = rng.integers(0, 255, len(data) - 602, dtype=np.uint8).tobytes()
    return bytes(data)


# (case id, request fields, expected code, words the message must contain, field named in BadRequest)
CASES = [
    ("empty bytes", {"image": common_pb2.Image(encoded=b"")}, INVALID, "empty", "image.encoded"),
    ("no image at all", {}, INVALID, "image is empty", "image"),
    ("truncated jpeg", {"image": common_pb2.Image(encoded=BUS.read_bytes()[:40_000])}, INVALID, "truncated", "image.encoded"),
    ("corrupt jpeg", {"image": common_pb2.Image(encoded=_corrupt_jpeg())}, INVALID, "JPEG", "image.encoded"),
    ("not an image", {"image": common_pb2.Image(encoded=b"%PDF-1.7 not a photo")}, INVALID, "not a supported image", "image.encoded"),
    ("truncated png", {"image": common_pb2.Image(encoded=_png(50, 50)[:60])}, INVALID, "PNG", "image.encoded"),
    ("raw size mismatch", {"image": _raw(64, 48, data_len=64 * 48 * 3 - 1)}, INVALID, "needs 9216", "image.raw.data"),
    ("raw zero width", {"image": _raw(0, 48)}, INVALID, "positive", "image.raw.width"),
    ("raw negative height", {"image": _raw(64, -48)}, INVALID, "positive", "image.raw.height"),
    ("raw no pixel format", {"image": _raw(4, 4, fmt=common_pb2.PIXEL_FORMAT_UNSPECIFIED)}, INVALID, "pixel_format", "image.raw.pixel_format"),
    ("confidence above 1", {"confidence_threshold": 1.5}, INVALID, "within [0, 1]", "confidence_threshold"),
    ("confidence below 0", {"confidence_threshold": -0.1}, INVALID, "within [0, 1]", "confidence_threshold"),
    ("confidence NaN", {"confidence_threshold": math.nan}, INVALID, "within [0, 1]", "confidence_threshold"),
    ("iou above 1", {"iou_threshold": 2.0}, INVALID, "within [0, 1]", "iou_threshold"),
    ("negative max detections", {"max_detections": -1}, INVALID, "max_detections", "max_detections"),
    ("huge max detections", {"max_detections": 50_000}, INVALID, "max_detections", "max_detections"),
    ("unknown class name", {"class_names": ["unicorn"]}, INVALID, "unknown class name 'unicorn'", "class_names"),
    ("long unknown class name", {"class_names": ["u" * 250]}, INVALID, "... (250 characters); known names", "class_names"),
    ("oversized class name", {"class_names": ["bus", "x" * 20_000]}, INVALID, "class_names[1] is 20000 characters long", "class_names[1]"),
    ("unknown class id", {"class_ids": [80]}, INVALID, "0..79", "class_ids"),
    ("all classes and a filter", {"all_classes": True, "class_names": ["bus"]}, INVALID, "all_classes", "all_classes"),
    ("png over the pixel limit", {"image": common_pb2.Image(encoded=_png(2000, 2000))}, EXHAUSTED, f"limit of {MAX_IMAGE_PIXELS}", "image.encoded"),
    ("TIFF over the pixel limit", {"image": common_pb2.Image(encoded=_tiff_header(12000, 12000))}, EXHAUSTED, "12000x12000", "image.encoded"),
    ("raw over the pixel limit", {"image": _raw(1800, 1800, fmt=common_pb2.PIXEL_FORMAT_GRAY8, data_len=1800 * 1800 // 3)}, EXHAUSTED, "pixels", "image.raw"),
]  # fmt: skip


@pytest.fixture(scope="module")
def vision(channel: grpc.Channel) -> vision_service_pb2_grpc.VisionServiceStub:
    return vision_service_pb2_grpc.VisionServiceStub(channel)


def _assert_still_serving(vision: vision_service_pb2_grpc.VisionServiceStub) -> None:
    response = vision.Detect(vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=_bus())), timeout=60)
    assert len(response.detections) == 4


@pytest.mark.parametrize(("fields", "code", "words", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(vision, fields: dict, code: grpc.StatusCode, words: str, field: str) -> None:  # noqa: ANN001
    request = vision_service_pb2.DetectRequest(**fields)
    if "image" not in fields and "image is empty" not in words:
        request.image.encoded = _bus()
    with pytest.raises(grpc.RpcError) as info:
        vision.Detect(request, timeout=30)
    error = info.value
    assert error.code() == code, error.details()
    assert words in error.details()
    violations = bad_request_fields(error)
    assert violations is not None, "no google.rpc.Status in the trailers"
    assert violations == [field]
    _assert_still_serving(vision)


def test_message_over_the_size_limit(vision) -> None:  # noqa: ANN001
    # Bigger than the server's max receive size: gRPC itself refuses it before any decoding.
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=b"\xff\xd8\xff" + b"\0" * MAX_MESSAGE_BYTES))
    with pytest.raises(grpc.RpcError) as info:
        vision.Detect(request, timeout=30)
    assert info.value.code() == EXHAUSTED
    assert "larger than max" in info.value.details()
    _assert_still_serving(vision)
