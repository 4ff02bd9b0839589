"""Artifact writers of the segmentation job, one frame at a time (a whole video never sits in
memory). Blocking: drive them from a thread.

* Mask video: FFV1 (lossless) in Matroska, gray8, through PyAV — ``MaskVideoWriter``.
* Mask PNGs in a zip: one 8-bit grayscale PNG per processed frame, named by its SOURCE frame
  index (``000042.png``), stored uncompressed in the zip (PNG already is) — ``MaskZipWriter``.
* Overlay mp4: H.264 (libx264, yuv420p) through PyAV when it is available, else OpenCV's
  MPEG-4 Part 2 ('mp4v'); ``OverlayWriter.codec`` says which — ``OverlayWriter``.
* Per-frame JSON: one JSON array, one object per processed frame — ``FramesJsonWriter``.

Mask pixel values (both mask artifacts): 0 is background. With one object its pixels are 255;
with several, each object's pixels hold its object id (1..255) and where masks overlap the
higher id wins (see ``label_mask``).

Output frame rate: the processed frames are written at a constant rate such that the result
lasts as long as the source (``video_reader.plan_fps``); frames.json carries exact times.
Containers are written with FFmpeg's bitexact flag (no random segment UIDs, no version
strings), so the mask video, the zip and the JSON come out byte for byte the same when the same
frames are written again (a re-run artifacts stage reproduces their sha256). The H.264 overlay
does not: libx264 as shipped in PyAV's wheels varies its bitstream slightly from run to run.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self

import cv2
import numpy as np

from server.media.video_reader import import_av

__all__ = [
    "CODEC_H264",
    "CODEC_MP4V",
    "FramesJsonWriter",
    "MaskVideoWriter",
    "MaskZipWriter",
    "OverlayWriter",
    "draw_overlay",
    "h264_available",
    "label_mask",
    "mask_png_name",
]

CODEC_H264 = "h264"  # libx264 through PyAV
CODEC_MP4V = "mp4v"  # OpenCV's MPEG-4 Part 2 fallback

# Distinct BGR colours per object id (cycled); chosen to stay visible on most footage.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (60, 220, 60),
    (255, 120, 30),
    (40, 40, 230),
    (0, 210, 230),
    (220, 60, 220),
    (230, 230, 0),
    (130, 0, 255),
    (0, 130, 255),
)
_OVERLAY_ALPHA = 0.45


def label_mask(masks: Sequence[tuple[int, np.ndarray]], height: int, width: int) -> np.ndarray:
    """(object id, HxW bool mask) pairs -> one HxW uint8 frame: 0 background; one object: 255;
    several: the object id, painted in ascending id order so the higher id wins an overlap."""
    out = np.zeros((height, width), dtype=np.uint8)
    if len(masks) == 1:
        out[masks[0][1]] = 255
        return out
    for object_id, mask in sorted(masks, key=lambda m: m[0]):
        if not 1 <= object_id <= 255:
            raise ValueError(f"object id {object_id} does not fit an 8-bit mask (1..255)")
        out[mask] = object_id
    return out


def mask_png_name(source_frame_index: int) -> str:
    return f"{source_frame_index:06d}.png"


def h264_available() -> bool:
    av = import_av()
    return av is not None and "libx264" in av.codecs_available


def _rate(fps: float) -> Fraction:
    # 1001-denominators cover the NTSC rates (29.97 = 30000/1001) exactly.
    return Fraction(fps).limit_denominator(1001 * 1000)


class _Closing:
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class MaskVideoWriter(_Closing):
    """Lossless gray8 mask video: FFV1 in Matroska (PyAV required)."""

    codec = "ffv1"
    media_type = "video/x-matroska"

    def __init__(self, path: Path, width: int, height: int, fps: float) -> None:
        av = import_av()
        if av is None:
            raise RuntimeError("the lossless mask video needs PyAV (pip install av)")
        self.width, self.height = width, height
        self._av: ModuleType = av
        self._container = av.open(str(path), mode="w", format="matroska", options={"fflags": "+bitexact"})
        self._stream = self._container.add_stream("ffv1", rate=_rate(fps))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "gray"
        self._closed = False

    def write(self, mask: np.ndarray) -> None:
        if mask.shape != (self.height, self.width) or mask.dtype != np.uint8:
            raise ValueError(f"mask must be uint8 {self.height}x{self.width}, got {mask.dtype} {mask.shape}")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(mask), format="gray")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()


class MaskZipWriter(_Closing):
    """8-bit grayscale PNG per frame in a zip; fixed entry dates keep the bytes reproducible."""

    media_type = "application/zip"

    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED)
        self._closed = False

    def write(self, source_frame_index: int, mask: np.ndarray) -> None:
        if mask.ndim != 2 or mask.dtype != np.uint8:
            raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
        ok, png = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError(f"PNG encoding of frame {source_frame_index} failed")
        info = zipfile.ZipInfo(mask_png_name(source_frame_index), date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        self._zip.writestr(info, png.tobytes())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._zip.close()


class OverlayWriter(_Closing):
    """The source frames with the masks drawn on them, as an mp4.

    4:2:0 video needs even dimensions: an odd width or height is padded by one replicated pixel
    on the right / bottom (``width``/``height`` are the output's, ``source_*`` the input's)."""

    media_type = "video/mp4"

    def __init__(self, path: Path, width: int, height: int, fps: float, *, codec: str | None = None) -> None:
        self.source_width, self.source_height = width, height
        self._closed = False
        self._av: ModuleType | None = None
        self._cv_writer: cv2.VideoWriter | None = None
        if codec not in (None, CODEC_H264, CODEC_MP4V):
            raise ValueError(f"unknown overlay codec {codec!r}")
        if codec == CODEC_H264 or (codec is None and h264_available()):
            try:
                self._open_h264(path, fps)
            except Exception:
                if codec == CODEC_H264:
                    raise
                # libx264 listed but unusable (a stripped FFmpeg build): OpenCV still works.
                self._open_mp4v(path, fps)
        else:
            self._open_mp4v(path, fps)

    def _open_h264(self, path: Path, fps: float) -> None:
        av = import_av()
        if av is None:
            raise RuntimeError("H.264 output needs PyAV")
        self.width, self.height = self.source_width + self.source_width % 2, self.source_height + self.source_height % 2
        container = av.open(
            str(path), mode="w", format="mp4", options={"fflags": "+bitexact", "movflags": "+faststart"}
        )
        try:
            stream = container.add_stream("libx264", rate=_rate(fps), options={"crf": "23", "preset": "veryfast"})
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, "yuv420p"
            stream.codec_context.open()  # fail here, not on the first frame, if the encoder is unusable
        except BaseException:
            container.close()
            raise
        self._av, self._container, self._stream = av, container, stream
        self.codec = CODEC_H264

    def _open_mp4v(self, path: Path, fps: float) -> None:
        # OpenCV's FFmpeg writer silently rounds odd sizes down (cropping); pad instead.
        self.width, self.height = self.source_width + self.source_width % 2, self.source_height + self.source_height % 2
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (self.width, self.height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV could not open an mp4v video writer")
        self._cv_writer = writer
        self.codec = CODEC_MP4V

    def write(self, bgr: np.ndarray) -> None:
        if bgr.shape != (self.source_height, self.source_width, 3):
            raise ValueError(f"frame must be {self.source_height}x{self.source_width}x3, got {bgr.shape}")
        if (self.width, self.height) != (self.source_width, self.source_height):
            bgr = cv2.copyMakeBorder(
                bgr, 0, self.height - self.source_height, 0, self.width - self.source_width, cv2.BORDER_REPLICATE
            )
        if self._cv_writer is not None:
            self._cv_writer.write(bgr)
            return
        assert self._av is not None
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(bgr), format="bgr24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._cv_writer is not None:
            self._cv_writer.release()
            return
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
        finally:
            self._container.close()


def draw_overlay(
    bgr: np.ndarray, objects: Sequence[tuple[int, np.ndarray, tuple[float, float, float, float], bool]]
) -> np.ndarray:
    """A copy of the frame with each (object id, bool mask, box, present) drawn: the mask tinted
    in the object's colour, its outline and, when present, its box."""
    out = bgr.copy()
    for object_id, mask, box, present in objects:
        colour = np.array(_PALETTE[(object_id - 1) % len(_PALETTE)], dtype=np.float32)
        if mask.any():
            region = out[mask].astype(np.float32)
            out[mask] = (region * (1 - _OVERLAY_ALPHA) + colour * _OVERLAY_ALPHA).astype(np.uint8)
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 2)
        if present:
            x1, y1, x2, y2 = (round(v) for v in box)
            if x2 > x1 and y2 > y1:
                cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), tuple(int(c) for c in colour), 2)
    return out


class FramesJsonWriter(_Closing):
    """A JSON array written one frame object at a time (one per line), so it streams:

    ``{"frame_index": processed index, "source_frame_index": index in the video, "time_s":
    seconds, "objects": [{"id", "box": [x1, y1, x2, y2] (pixels, x2/y2 exclusive), "score"
    (predicted IoU), "present", "object_score" (logit), "kalman_selected"}]}``"""

    media_type = "application/json"

    def __init__(self, path: Path) -> None:
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._file.write("[")
        self._count = 0
        self._closed = False

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(("\n" if self._count == 0 else ",\n") + json.dumps(record, separators=(",", ":")))
        self._count += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.write("\n]\n")
            self._file.close()
