"""Read an encoded image's format and size from its header, without decoding it.

Why: the pixel limit must be enforced before the decoder allocates the full image (a small
PNG can declare 100k x 100k pixels; a 12000x12000 TIFF decoded in full took 2.2 s and 470 MB
before the limit refused it), so every accepted format (ACCEPTED_FORMATS) has a size reader
here. And an error message is more useful when it can say what the bytes are ("PNG, 2 bytes
long" vs "not an image").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg", "png", "webp", "bmp", "tiff"
    width: int | None  # as stored, before EXIF orientation; None when the header is unreadable
    height: int | None
    # EXIF orientation of a JPEG (1 = as stored; 5..8 swap width and height).
    orientation: int = 1


def sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def read_header(data: bytes) -> ImageHeader | None:
    """Format and dimensions, or None when the bytes are not a supported image format."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    size = _SIZE_READERS[fmt](data)
    width, height = size if size else (None, None)
    orientation = _jpeg_orientation(data) if fmt == "jpeg" else 1
    return ImageHeader(fmt, width, height, orientation)


def _png_size(data: bytes) -> tuple[int, int] | None:
    # IHDR is always the first chunk: 8-byte signature, length, "IHDR", width, height.
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the marker segments up to the first start-of-frame, which holds height and width.
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation tag (0x0112) from the APP1 segment, 1 when absent or unreadable."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        if marker in _JPEG_SOF or marker == 0xDA:  # EXIF comes before the image data
            return 1
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    endian = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (entries,) = struct.unpack(endian + "H", tiff[ifd : ifd + 2])
    for i in range(entries):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return 1
        tag, kind, _count = struct.unpack(endian + "HHI", tiff[entry : entry + 8])
        if tag == 0x0112 and kind == 3:  # SHORT
            (value,) = struct.unpack(endian + "H", tiff[entry + 8 : entry + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 22:
        return None
    (info_size,) = struct.unpack("<I", data[14:18])
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    if len(data) < 26:
        return None
    width, height = struct.unpack("<ii", data[18:26])  # negative height: rows stored top-down
    return abs(width), abs(height)


_TIFF_IMAGE_WIDTH = 256
_TIFF_IMAGE_LENGTH = 257
_TIFF_SHORT, _TIFF_LONG = 3, 4


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth and ImageLength of the first image (IFD 0), the one OpenCV decodes. A TIFF
    keeps them in its first directory, which may sit anywhere in the file (often at the end)."""
    endian = "<" if data[:2] == b"II" else ">"
    if len(data) < 8:
        return None
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    if ifd < 8 or ifd + 2 > len(data):
        return None
    (entries,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    size: dict[int, int] = {}
    for i in range(entries):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(data):
            return None
        tag, kind, count = struct.unpack(endian + "HHI", data[entry : entry + 8])
        if tag not in (_TIFF_IMAGE_WIDTH, _TIFF_IMAGE_LENGTH) or count != 1:
            continue
        if kind == _TIFF_SHORT:  # left-justified in the 4-byte value field
            (size[tag],) = struct.unpack(endian + "H", data[entry + 8 : entry + 10])
        elif kind == _TIFF_LONG:
            (size[tag],) = struct.unpack(endian + "I", data[entry + 8 : entry + 12])
    if _TIFF_IMAGE_WIDTH not in size or _TIFF_IMAGE_LENGTH not in size:
        return None
    return size[_TIFF_IMAGE_WIDTH], size[_TIFF_IMAGE_LENGTH]


# Every accepted format has a reader: an image's size is always known before it is decoded.
_SIZE_READERS = {"png": _png_size, "jpeg": _jpeg_size, "webp": _webp_size, "bmp": _bmp_size, "tiff": _tiff_size}
ACCEPTED_FORMATS = ("JPEG", "PNG", "WebP", "BMP", "TIFF")
