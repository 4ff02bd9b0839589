"""Pure image maths, no server: letterbox, YOLOv8 decoding + NMS, header sniffing, decoding."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from framewise.v1 import common_pb2
from server.errors import InvalidInput, TooLarge
from server.vision.image_decode import decode_image
from server.vision.image_header import read_header
from server.vision.letterbox import letterbox
from server.vision.yolo import decode_yolov8


@pytest.mark.parametrize(("height", "width"), [(1080, 810), (720, 1280), (640, 640), (3, 10), (2000, 500), (1, 5000)])
def test_letterbox_keeps_aspect_and_maps_back(height: int, width: int) -> None:
    image = np.zeros((height, width, 3), np.uint8)
    canvas, mapping = letterbox(image, (640, 640), 114)
    assert canvas.shape == (640, 640, 3)
    scale = min(640 / height, 640 / width)
    assert mapping.scale == pytest.approx(scale)
    # Padding is split evenly (the odd pixel on the right/bottom), so the content is centred.
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    assert mapping.pad_left == (640 - new_w) // 2 and mapping.pad_top == (640 - new_h) // 2
    if mapping.pad_left:
        assert (canvas[:, : mapping.pad_left] == 114).all()
    # A box drawn in source pixels, pushed into model space and back, lands where it started.
    source = np.array([[0.1 * width, 0.2 * height, 0.7 * width, 0.9 * height]], np.float32)
    model = source * scale + np.array([mapping.pad_left, mapping.pad_top] * 2, np.float32)
    np.testing.assert_allclose(mapping.to_source(model, (width, height)), source, atol=1e-3 * max(width, height))


def test_letterbox_mapping_clips_to_the_image() -> None:
    _, mapping = letterbox(np.zeros((100, 200, 3), np.uint8), (640, 640), 114)
    boxes = mapping.to_source(np.array([[-50, -50, 700, 700]], np.float32), (200, 100))
    np.testing.assert_allclose(boxes, [[0, 0, 200, 100]])


def _head(boxes: list[tuple[float, float, float, float, int, float]], num_classes: int = 3, anchors: int = 20) -> np.ndarray:
    """A raw YOLOv8 head: rows cx, cy, w, h, then one score row per class."""
    out = np.zeros((4 + num_classes, anchors), np.float32)
    for i, (cx, cy, w, h, cls, score) in enumerate(boxes):
        out[:4, i] = (cx, cy, w, h)
        out[4 + cls, i] = score
    return out


def test_nms_suppresses_overlap_within_a_class_only() -> None:
    head = _head([
        (100, 100, 50, 80, 0, 0.9),   # person
        (102, 101, 50, 80, 0, 0.8),   # same person, lower score: suppressed
        (101, 100, 52, 78, 1, 0.7),   # another class at the same place: kept
        (300, 300, 40, 40, 0, 0.6),   # another person: kept
        (500, 500, 40, 40, 0, 0.2),   # below the confidence threshold
    ])  # fmt: skip
    result = decode_yolov8(head, confidence=0.25, iou=0.45, max_detections=100, class_mask=None)
    assert result.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert result.class_ids.tolist() == [0, 1, 0]
    np.testing.assert_allclose(result.boxes[0], [75, 60, 125, 140])


def test_class_mask_and_max_detections() -> None:
    head = _head([(100, 100, 50, 80, 0, 0.9), (101, 100, 52, 78, 1, 0.95), (300, 300, 40, 40, 0, 0.6)])
    only_class_0 = np.array([True, False, False])
    result = decode_yolov8(head, confidence=0.25, iou=0.45, max_detections=100, class_mask=only_class_0)
    assert result.class_ids.tolist() == [0, 0]
    top1 = decode_yolov8(head, confidence=0.25, iou=0.45, max_detections=1, class_mask=None)
    assert top1.scores.tolist() == pytest.approx([0.95])


def test_no_detection_above_threshold() -> None:
    result = decode_yolov8(_head([(10, 10, 5, 5, 0, 0.1)]), confidence=0.25, iou=0.45, max_detections=10, class_mask=None)
    assert result.boxes.shape == (0, 4)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
def test_header_reads_size_without_decoding(ext: str) -> None:
    ok, encoded = cv2.imencode(ext, np.zeros((37, 53, 3), np.uint8))
    assert ok
    header = read_header(encoded.tobytes())
    assert header is not None
    assert (header.width, header.height) == (53, 37)


def _tiff_header(width: int, height: int, endian: str = "<", kind: int = 4) -> bytes:
    """A TIFF that is only a header: IFD 0 with ImageWidth and ImageLength, no pixel data."""
    value = (lambda v: struct.pack(endian + "HH", v, 0)) if kind == 3 else (lambda v: struct.pack(endian + "I", v))
    entries = [struct.pack(endian + "HHI", 256, kind, 1) + value(width), struct.pack(endian + "HHI", 257, kind, 1) + value(height)]
    magic = b"II*\x00" if endian == "<" else b"MM\x00*"
    return magic + struct.pack(endian + "IH", 8, len(entries)) + b"".join(entries) + struct.pack(endian + "I", 0)


@pytest.mark.parametrize(("endian", "kind"), [("<", 3), ("<", 4), (">", 3), (">", 4)])
def test_tiff_header_size_in_either_byte_order_and_type(endian: str, kind: int) -> None:
    header = read_header(_tiff_header(1200, 345, endian, kind))
    assert header is not None and header.format == "tiff" and (header.width, header.height) == (1200, 345)


def test_bmp_core_header_size() -> None:
    # OS/2 BITMAPCOREHEADER: a 12-byte info header with 16-bit sizes.
    data = b"BM" + struct.pack("<IHHI", 26, 0, 0, 26) + struct.pack("<IHHHH", 12, 640, 480, 1, 24)
    header = read_header(data)
    assert header is not None and (header.width, header.height) == (640, 480)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp", ".tiff"])
def test_pixel_limit_refuses_every_format_before_decoding(ext: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ok, encoded = cv2.imencode(ext, np.zeros((1000, 1000, 3), np.uint8))
    assert ok

    def must_not_decode(*_args: object) -> None:
        raise AssertionError(f"{ext} was decoded before its size was checked")

    monkeypatch.setattr(cv2, "imdecode", must_not_decode)
    with pytest.raises(TooLarge, match="1000x1000"):
        decode_image(_encoded(encoded.tobytes()), max_pixels=999_999)


def test_a_huge_tiff_is_refused_from_its_header() -> None:
    # 12000x12000 declared in a few dozen bytes: refused with the size, never handed to the decoder.
    with pytest.raises(TooLarge, match="12000x12000"):
        decode_image(_encoded(_tiff_header(12000, 12000)), max_pixels=50_000_000)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"II*\x00" + struct.pack("<I", 4000), id="tiff-directory-past-the-end"),
        pytest.param(_tiff_header(10, 10)[:20], id="tiff-directory-cut"),
        pytest.param(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", id="png-without-size"),
        pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", id="jpeg-without-frame-header"),
        pytest.param(b"RIFF\x00\x00\x00\x00WEBPVP8 ", id="webp-without-size"),
        pytest.param(b"BM\x00\x00", id="bmp-without-size"),
    ],
)
def test_an_image_whose_size_cannot_be_read_is_refused_undecoded(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cv2, "imdecode", lambda *_: pytest.fail("decoded an image of unknown size"))
    with pytest.raises(InvalidInput, match="header is truncated or corrupt") as refused:
        decode_image(_encoded(data), max_pixels=10**7)
    assert refused.value.violations[0].field == "image.encoded"


def test_header_rejects_non_images() -> None:
    assert read_header(b"GIF89a....") is None
    assert read_header(b"hello world") is None


def _encoded(data: bytes) -> common_pb2.Image:
    return common_pb2.Image(encoded=data)


def test_truncated_jpeg_is_rejected() -> None:
    ok, encoded = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    with pytest.raises(InvalidInput, match="truncated"):
        decode_image(_encoded(encoded.tobytes()[:3000]), max_pixels=10**7)


def test_pixel_limit_is_checked_from_the_header() -> None:
    ok, encoded = cv2.imencode(".png", np.zeros((1000, 1000), np.uint8))
    with pytest.raises(TooLarge, match="1000x1000"):
        decode_image(_encoded(encoded.tobytes()), max_pixels=999_999)


def test_large_jpeg_is_decoded_reduced_but_reports_original_size() -> None:
    image = np.zeros((3000, 4000, 3), np.uint8)
    ok, encoded = cv2.imencode(".jpg", image)
    decoded = decode_image(_encoded(encoded.tobytes()), max_pixels=10**8, min_decoded_size=(640, 640))
    assert (decoded.width, decoded.height) == (4000, 3000)
    assert decoded.rgb.shape == (750, 1000, 3)  # 1/4 scale still covers 640x640
    assert decoded.scale == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (common_pb2.RawFrame(width=0, height=10, pixel_format=common_pb2.PIXEL_FORMAT_RGB8), "positive"),
        (common_pb2.RawFrame(width=-4, height=10, pixel_format=common_pb2.PIXEL_FORMAT_RGB8), "positive"),
        (common_pb2.RawFrame(width=4, height=4, data=b"\0" * 48), "pixel_format"),
        (common_pb2.RawFrame(width=4, height=4, pixel_format=common_pb2.PIXEL_FORMAT_RGB8, data=b"\0" * 47), "needs 48"),
    ],
)
def test_raw_frame_validation(raw: common_pb2.RawFrame, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_image(common_pb2.Image(raw=raw), max_pixels=10**7)


def test_raw_frame_formats_convert_to_rgb() -> None:
    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[..., 0] = 255  # blue
    raw = common_pb2.RawFrame(width=3, height=2, pixel_format=common_pb2.PIXEL_FORMAT_BGRA8, data=bgra.tobytes())
    decoded = decode_image(common_pb2.Image(raw=raw), max_pixels=100)
    assert decoded.rgb.shape == (2, 3, 3)
    assert (decoded.rgb[..., 2] == 255).all() and (decoded.rgb[..., 0] == 0).all()


def _jpeg_with_orientation(orientation: int) -> bytes:
    import struct

    image = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8), (7, 7), 3)
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    # A minimal little-endian EXIF block: IFD0 with one entry, Orientation (0x0112, SHORT).
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff
    return jpeg[:2] + app1 + jpeg[2:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_opencv(orientation: int) -> None:
    # Pixels come upright (EXIF applied) and the reported size is the upright one.
    data = _jpeg_with_orientation(orientation)
    assert read_header(data).orientation == orientation
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    decoded = decode_image(_encoded(data), max_pixels=10**6)
    np.testing.assert_array_equal(decoded.rgb, expected)
    assert (decoded.width, decoded.height) == (expected.shape[1], expected.shape[0])


@pytest.mark.parametrize("orientation", [1, 6])
def test_reduced_decode_reports_the_upright_size(orientation: int) -> None:
    # A large JPEG decoded at reduced scale takes its size from the header; a 90-degree EXIF
    # rotation swaps the axes.
    import struct

    jpeg = cv2.imencode(".jpg", np.zeros((1600, 2400, 3), np.uint8))[1].tobytes()
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff + jpeg[2:]
    decoded = decode_image(_encoded(data), max_pixels=10**8, min_decoded_size=(640, 640))
    assert decoded.scale == pytest.approx(2.0)
    assert (decoded.width, decoded.height) == ((2400, 1600) if orientation == 1 else (1600, 2400))
    assert decoded.rgb.shape[:2] == ((800, 1200) if orientation == 1 else (1200, 800))
