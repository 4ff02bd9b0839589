"""Video files for the segmentation job: probe, sampling plan, and decoding of exactly the
planned frames.

OpenCV (its bundled FFmpeg) is the decoder; when it cannot open or decode a file and PyAV is
installed, PyAV is tried instead, and the backend that worked is recorded so every later pass
over the file decodes it the same way. Frames are BGR uint8, in stream order; a frame's time is
``source_frame_index / fps`` (constant-rate assumption, as SAM 2's video loader makes).

Sampling: ``sample_fps`` keeps the source frame nearest to each tick of a
``sample_fps`` clock; ``max_frames`` then thins the plan evenly over the whole duration (each
kept frame stands for an equal slice of time) instead of cutting the video short.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

__all__ = [
    "BACKEND_OPENCV",
    "BACKEND_PYAV",
    "UnreadableVideo",
    "VideoInfo",
    "check_first_frame",
    "import_av",
    "plan_fps",
    "probe_video",
    "read_frames",
    "sampling_plan",
]

BACKEND_OPENCV = "opencv"
BACKEND_PYAV = "pyav"

_REENCODE_HINT = (
    "re-encode it (for example `ffmpeg -i input -c:v libx264 -pix_fmt yuv420p output.mp4`) and submit it again"
)


class UnreadableVideo(ValueError):
    """The file is not a video this server can decode (not a video, corrupt, truncated, or an
    unsupported codec). The message says what went wrong and what to do about it."""


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frame_count: int
    width: int
    height: int
    # Which decoder opened the file: BACKEND_OPENCV or BACKEND_PYAV.
    backend: str

    @property
    def duration_s(self) -> float:
        return self.frame_count / self.fps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VideoInfo:
        return cls(**values)


def import_av() -> ModuleType | None:
    """PyAV when it is installed (an optional dependency), else None."""
    try:
        import av
    except ImportError:
        return None
    return av


# ---------------------------------------------------------------------------------- probe


def probe_video(path: Path) -> VideoInfo:
    """Frame rate, exact frame count and size; decodes the first frame to prove the file is a
    video (its size is taken from that frame, so rotation metadata cannot mislead it). Blocking:
    call it in a thread. Raises UnreadableVideo."""
    if not path.is_file():
        raise UnreadableVideo(f"the video file {path.name!r} does not exist or is not a regular file")
    try:
        return _probe_opencv(path)
    except UnreadableVideo as opencv_error:
        av = import_av()
        if av is None:
            raise
        try:
            return _probe_pyav(path, av)
        except UnreadableVideo as pyav_error:
            raise UnreadableVideo(f"{opencv_error} (PyAV: {pyav_error})") from pyav_error


def _probe_opencv(path: Path) -> VideoInfo:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise UnreadableVideo(
                f"{path.name!r} could not be opened as a video: it is not a video file, or it is corrupt or "
                f"truncated; {_REENCODE_HINT}"
            )
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        ok, frame = capture.read()
        if not ok or frame is None:
            raise UnreadableVideo(f"the first frame of {path.name!r} could not be decoded; {_REENCODE_HINT}")
        height, width = frame.shape[:2]
        count = _declared_frame_count(path)
        if count is None:
            # OpenCV's own count is only an estimate (duration x fps) when the container has no
            # frame count (Matroska, WebM, raw streams): count by decoding instead.
            count = 1
            while capture.grab():
                count += 1
    finally:
        capture.release()
    return VideoInfo(_checked_fps(fps, path), count, int(width), int(height), BACKEND_OPENCV)


def _declared_frame_count(path: Path) -> int | None:
    """The exact frame count without decoding, or None when only decoding can tell.

    With PyAV: the count the container states (MP4/MOV sample tables), else the number of
    video packets found by demuxing (one frame per packet; far cheaper than decoding). Without
    PyAV only ISO-BMFF files are trusted: OpenCV reads their sample table exactly, while for
    other containers its count is an estimate (duration x fps)."""
    av = import_av()
    if av is not None:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    return None
                stream = container.streams.video[0]
                if stream.frames > 0:
                    return int(stream.frames)
                packets = sum(1 for packet in container.demux(stream) if packet.size > 0)
                return packets or None
        except Exception:  # noqa: BLE001 - any demuxer error: fall back to counting by decoding
            return None
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] != b"ftyp":
        return None
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    return count if count > 0 else None


def _probe_pyav(path: Path, av: ModuleType) -> VideoInfo:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise UnreadableVideo(f"{path.name!r} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            declared = int(stream.frames or 0)
            first = None
            count = 0
            for frame in container.decode(stream):
                if first is None:
                    first = frame
                count += 1
                if declared > 0:
                    break  # the container states the count: no need to decode the rest
            if first is None:
                raise UnreadableVideo(f"{path.name!r} has a video stream but no decodable frame; {_REENCODE_HINT}")
            width, height = first.width, first.height
    except UnreadableVideo:
        raise
    except Exception as exc:  # FFmpeg reports hostile input through many exception types
        raise UnreadableVideo(f"{path.name!r} could not be decoded ({exc}); {_REENCODE_HINT}") from exc
    return VideoInfo(
        _checked_fps(float(rate) if rate else 0.0, path), declared or count, int(width), int(height), BACKEND_PYAV
    )


def _checked_fps(fps: float, path: Path) -> float:
    if not math.isfinite(fps) or fps <= 0:
        raise UnreadableVideo(f"{path.name!r} does not state a frame rate; {_REENCODE_HINT}")
    return fps


# ---------------------------------------------------------------------------------- plan


def sampling_plan(source_fps: float, frame_count: int, *, sample_fps: float = 0.0, max_frames: int = 0) -> list[int]:
    """Source frame indices to process, ascending. ``sample_fps`` 0 (or >= the source rate):
    every frame; else the frame nearest to each tick k / sample_fps. ``max_frames`` 0: no cap;
    else at most that many, spread evenly over the plan (and so over the video's time)."""
    if not (math.isfinite(sample_fps) and sample_fps >= 0):
        raise ValueError(f"sample_fps must be >= 0, got {sample_fps}")
    if max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if frame_count <= 0:
        return []
    if sample_fps == 0 or sample_fps >= source_fps:
        plan = np.arange(frame_count)
    else:
        step = source_fps / sample_fps  # source frames per sampled frame, > 1
        # Ticks inside the video's duration (frame_count / source_fps seconds).
        ticks = np.arange(math.ceil(frame_count / step - 1e-9))
        # +1e-6: a tick that lands on .5 in exact arithmetic must not flip with float rounding;
        # the last tick may fall after the last frame's time: that frame is the nearest one.
        nearest = np.floor(ticks * step + 0.5 + 1e-6).astype(np.int64)
        plan = np.unique(np.minimum(nearest, frame_count - 1))
    if max_frames and plan.size > max_frames:
        keep = np.floor(np.arange(max_frames) * (plan.size / max_frames) + 1e-6).astype(np.int64)
        plan = plan[keep]
    return [int(i) for i in plan]


def plan_fps(source_fps: float, frame_count: int, processed: int) -> float:
    """Frame rate of a video made of the planned frames that lasts as long as the source."""
    if frame_count <= 0 or processed <= 0:
        return source_fps
    return source_fps * processed / frame_count


# ---------------------------------------------------------------------------------- decode


def read_frames(
    path: Path, indices: Sequence[int], *, backend: str = BACKEND_OPENCV
) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (source index, BGR uint8 HxWx3) for exactly ``indices`` (strictly ascending), in
    order. Skipped frames are only grabbed (demuxed and decoded, never converted to BGR). Raises
    UnreadableVideo when the file ends or breaks before the last wanted frame. Blocking: advance
    it in a thread; close it (contextlib.closing) to release the decoder early."""
    wanted = [int(i) for i in indices]
    if any(b <= a for a, b in itertools.pairwise(wanted)) or (wanted and wanted[0] < 0):
        raise ValueError("frame indices must be >= 0 and strictly ascending")
    if not wanted:
        return iter(())
    if backend == BACKEND_PYAV:
        av = import_av()
        if av is None:
            raise UnreadableVideo("the video was probed with PyAV, which is no longer installed on this server")
        return _read_pyav(path, wanted, av)
    return _read_opencv(path, wanted)


def _read_opencv(path: Path, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise UnreadableVideo(f"{path.name!r} could not be opened as a video any more; {_REENCODE_HINT}")
        position = 0
        for target in wanted:
            while position < target:
                if not capture.grab():
                    raise _ended(path, position, target)
                position += 1
            ok, frame = capture.read()
            if not ok or frame is None:
                raise _ended(path, position, target)
            position += 1
            yield target, frame
    finally:
        capture.release()


def _read_pyav(path: Path, wanted: list[int], av: ModuleType) -> Iterator[tuple[int, np.ndarray]]:
    targets = iter(wanted)
    target: int | None = next(targets)
    decoded = 0  # frames decoded so far = the index of the next one
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if decoded == target:
                    yield target, frame.to_ndarray(format="bgr24")
                    target = next(targets, None)
                    if target is None:
                        return
                decoded += 1
    except Exception as exc:  # FFmpeg reports hostile input through many exception types
        raise UnreadableVideo(f"{path.name!r} broke while decoding frame {decoded} ({exc}); {_REENCODE_HINT}") from exc
    assert target is not None
    raise _ended(path, decoded, target)


def _ended(path: Path, position: int, target: int) -> UnreadableVideo:
    return UnreadableVideo(
        f"{path.name!r} ended or could not be decoded at frame {position} (frame {target} was needed): the file is "
        f"truncated or corrupt; {_REENCODE_HINT}"
    )


def check_first_frame(path: Path, *, backend: str = BACKEND_OPENCV) -> np.ndarray:
    """Decodes frame 0 (UnreadableVideo if it cannot be). Blocking: call it in a thread."""
    frames = read_frames(path, [0], backend=backend)
    try:
        _, frame = next(iter(frames))
    except StopIteration:  # pragma: no cover - read_frames raises before it runs dry
        raise UnreadableVideo(f"the first frame of {path.name!r} could not be decoded; {_REENCODE_HINT}") from None
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    return frame
