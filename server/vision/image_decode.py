"""Turn a framewise.v1.Image (encoded bytes or raw frame) into RGB pixels, or a clear error."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from framewise.v1 import common_pb2
from server.errors import InvalidInput, TooLarge
from server.vision.image_header import ACCEPTED_FORMATS, read_header

_CHANNELS = {
    common_pb2.PIXEL_FORMAT_RGB8: 3,
    common_pb2.PIXEL_FORMAT_BGR8: 3,
    common_pb2.PIXEL_FORMAT_RGBA8: 4,
    common_pb2.PIXEL_FORMAT_BGRA8: 4,
    common_pb2.PIXEL_FORMAT_GRAY8: 1,
}
_TO_RGB = {
    common_pb2.PIXEL_FORMAT_BGR8: cv2.COLOR_BGR2RGB,
    common_pb2.PIXEL_FORMAT_RGBA8: cv2.COLOR_RGBA2RGB,
    common_pb2.PIXEL_FORMAT_BGRA8: cv2.COLOR_BGRA2RGB,
    common_pb2.PIXEL_FORMAT_GRAY8: cv2.COLOR_GRAY2RGB,
}
# JPEG can be decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, several times faster than a
# full decode followed by a resize.
_REDUCED_JPEG = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_ACCEPTED = ", ".join(ACCEPTED_FORMATS[:-1]) + " or " + ACCEPTED_FORMATS[-1]


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, C-contiguous
    width: int  # of the original image, the frame of reference for every output coordinate
    height: int

    @property
    def scale(self) -> float:
        """Original pixels per decoded pixel along x (> 1 when the JPEG was decoded reduced)."""
        return self.width / self.rgb.shape[1]

    @property
    def scale_y(self) -> float:
        """The same along y (OpenCV rounds each axis of a reduced decode separately)."""
        return self.height / self.rgb.shape[0]


def decode_image(
    image: common_pb2.Image,
    *,
    max_pixels: int,
    min_decoded_size: tuple[int, int] | None = None,
    field: str = "image",
) -> DecodedImage:
    """Decode and validate.

    min_decoded_size (height, width): when set, a large JPEG may be decoded at a reduced scale as
    long as the result still covers this size (the model input), because the model would only
    shrink it further.
    """
    kind = image.WhichOneof("source")
    if kind == "encoded":
        return _decode_encoded(image.encoded, max_pixels, min_decoded_size, f"{field}.encoded")
    if kind == "raw":
        return _decode_raw(image.raw, max_pixels, f"{field}.raw")
    raise InvalidInput(f"{field} is empty: set {field}.encoded ({_ACCEPTED} bytes) or {field}.raw", field)


def _decode_encoded(
    data: bytes, max_pixels: int, min_decoded_size: tuple[int, int] | None, field: str
) -> DecodedImage:
    if not data:
        raise InvalidInput(f"{field} is empty: send the bytes of a {_ACCEPTED} file", field)
    header = read_header(data)
    if header is None:
        raise InvalidInput(
            f"{field} is not a supported image ({len(data)} bytes starting with {data[:8].hex()}): "
            f"send {_ACCEPTED} bytes",
            field,
        )
    if header.width is None or header.height is None:
        # Never decoded without a known size: the decoder would allocate whatever the data holds
        # before the pixel limit could refuse it.
        raise InvalidInput(
            f"{field}: the {header.format.upper()} header is truncated or corrupt (its width and height cannot be "
            "read); send the whole file",
            field,
        )
    if header.width <= 0 or header.height <= 0:
        raise InvalidInput(f"{field}: the {header.format.upper()} header declares a zero size", field)
    _check_pixels(header.width, header.height, max_pixels, field)
    if header.format == "jpeg" and not _jpeg_is_complete(data):
        raise InvalidInput(
            f"{field}: the JPEG is truncated ({len(data)} bytes, no end-of-image marker); send the whole file",
            field,
        )

    buffer = np.frombuffer(data, dtype=np.uint8)
    flag, factor = cv2.IMREAD_COLOR, 1
    if header.format == "jpeg" and min_decoded_size and header.width and header.height:
        flag, factor = _reduced_flag(header.width, header.height, min_decoded_size)
    try:
        bgr = cv2.imdecode(buffer, flag)
    except cv2.error as exc:  # OpenCV's own size guard and codec failures
        raise InvalidInput(f"{field}: the {header.format.upper()} data could not be decoded ({exc.err})", field) from exc
    if bgr is None:
        raise InvalidInput(
            f"{field}: the {header.format.upper()} data is corrupt or truncated and could not be decoded", field
        )
    if factor == 1:
        height, width = bgr.shape[:2]
    else:
        width, height = (header.width, header.height)
        if header.orientation >= 5:  # OpenCV applied an EXIF 90-degree rotation: axes swap
            width, height = height, width
    _check_pixels(width, height, max_pixels, field)
    return DecodedImage(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), width, height)


def _reduced_flag(width: int, height: int, min_size: tuple[int, int]) -> tuple[int, int]:
    min_h, min_w = min_size
    for factor, flag in _REDUCED_JPEG:
        if width // factor >= min_w and height // factor >= min_h:
            return flag, factor
    return cv2.IMREAD_COLOR, 1


def _jpeg_is_complete(data: bytes) -> bool:
    # A complete JPEG ends with the EOI marker (FF D9), possibly followed by padding or a
    # trailer. OpenCV decodes a truncated JPEG "successfully" with the missing rows grey, so
    # this has to be checked here. FF D9 cannot occur inside entropy-coded data (byte stuffing).
    return b"\xff\xd9" in data[-4096:]


def _decode_raw(raw: common_pb2.RawFrame, max_pixels: int, field: str) -> DecodedImage:
    if raw.width <= 0 or raw.height <= 0:
        raise InvalidInput(
            f"{field}: width and height must be positive, got {raw.width}x{raw.height}",
            f"{field}.width" if raw.width <= 0 else f"{field}.height",
        )
    channels = _CHANNELS.get(raw.pixel_format)
    if channels is None:
        raise InvalidInput(
            f"{field}.pixel_format must be one of RGB8, BGR8, RGBA8, BGRA8, GRAY8", f"{field}.pixel_format"
        )
    _check_pixels(raw.width, raw.height, max_pixels, field)
    expected = raw.width * raw.height * channels
    if len(raw.data) != expected:
        raise InvalidInput(
            f"{field}.data holds {len(raw.data)} bytes but {raw.width}x{raw.height} "
            f"{common_pb2.PixelFormat.Name(raw.pixel_format)} needs {expected}",
            f"{field}.data",
        )
    pixels = np.frombuffer(raw.data, dtype=np.uint8).reshape(raw.height, raw.width, channels)
    conversion = _TO_RGB.get(raw.pixel_format)
    rgb = cv2.cvtColor(pixels, conversion) if conversion is not None else np.ascontiguousarray(pixels)
    return DecodedImage(rgb, raw.width, raw.height)


def _check_pixels(width: int, height: int, max_pixels: int, field: str) -> None:
    if width * height > max_pixels:
        raise TooLarge(
            f"{field}: {width}x{height} = {width * height} pixels exceeds this server's limit of "
            f"{max_pixels} pixels; downscale the image before sending it",
            field,
        )
