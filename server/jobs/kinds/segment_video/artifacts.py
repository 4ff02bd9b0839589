"""The WRITING_ARTIFACTS stage of the video segmentation job (its stages are in definition.py
beside this module): the mask video, the mask PNG zip, the overlay and frames.json, written
through server/media/video_writers.py.

The artifacts are made from ``tracks.jsonl`` only (and the source frames for the overlay), so
they can be written again after a crash without tracking again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure
from server.jobs.kinds.segment_video.propagation import TRACKS_FILE, decode_frames
from server.media.video_reader import UnreadableVideo, VideoInfo
from server.media.video_writers import (
    CODEC_H264,
    FramesJsonWriter,
    MaskVideoWriter,
    MaskZipWriter,
    OverlayWriter,
    draw_overlay,
    label_mask,
)
from server.vision import rle

__all__ = ["ARTIFACTS", "ArtifactSpec", "describe_artifact", "write_artifacts"]

A = jobs_pb2.ArtifactKind


@dataclass(frozen=True)
class ArtifactSpec:
    name: str
    kind: int
    media_type: str


# In the order they are written and listed.
ARTIFACTS: tuple[ArtifactSpec, ...] = (
    ArtifactSpec("masks.mkv", A.ARTIFACT_KIND_MASK_VIDEO, "video/x-matroska"),
    ArtifactSpec("masks.zip", A.ARTIFACT_KIND_MASK_PNG_ZIP, "application/zip"),
    ArtifactSpec("overlay.mp4", A.ARTIFACT_KIND_OVERLAY_MP4, "video/mp4"),
    ArtifactSpec("frames.json", A.ARTIFACT_KIND_FRAMES_JSON, "application/json"),
)


async def write_artifacts(
    ctx: JobContext,
    video: VideoInfo,
    plan: list[int],
    specs: list[ArtifactSpec],
    *,
    progress_every: int,
    percent: tuple[float, float],
) -> str | None:
    """Every artifact in ``specs`` from tracks.jsonl (and the source frames for the overlay),
    written into the working folder, then placed in the videos tier; progress every
    ``progress_every`` frames from percent[0] to percent[1]. Returns the overlay's codec (None
    without an overlay)."""
    out_dir = ctx.workdir / "artifacts"
    await asyncio.to_thread(shutil.rmtree, out_dir, True)
    out_dir.mkdir()
    writers = await asyncio.to_thread(_ArtifactWriters, out_dir, specs, video, ctx.state["output_fps"])
    tracks = await asyncio.to_thread(open, ctx.workdir / TRACKS_FILE, encoding="utf-8")
    try:
        frames = decode_frames(Path(ctx.state["source"]), plan, video.backend) if writers.needs_frames else None
        async with contextlib.aclosing(frames) if frames is not None else contextlib.nullcontext() as decoded:
            for done in range(1, len(plan) + 1):
                item = await anext(decoded) if decoded is not None else None
                await asyncio.to_thread(writers.write, tracks, item)
                if done % progress_every == 0 and done < len(plan):
                    start, end = percent
                    await ctx.progress(
                        start + (end - start) * done / len(plan),
                        f"wrote {done}/{len(plan)} frames",
                        done=done,
                        total=len(plan),
                    )
                ctx.check_cancelled()
        await asyncio.to_thread(writers.close)
    except UnreadableVideo as exc:
        raise JobFailure.permanent("corrupt_video", f"the video cannot be decoded: {exc}") from None
    finally:
        tracks.close()
        await asyncio.to_thread(writers.abort)
    for spec in specs:
        await ctx.add_artifact(out_dir / spec.name, name=spec.name, kind=spec.kind, media_type=spec.media_type)
    return writers.overlay_codec


class _ArtifactWriters:
    """The requested writers over one pass of tracks.jsonl (and the source frames). Sync: the
    stage calls it from a thread (asyncio.to_thread), one frame per call."""

    def __init__(self, out_dir: Path, specs: list[ArtifactSpec], video: VideoInfo, fps: float) -> None:
        self.video = video
        self.written = 0
        names = {spec.name for spec in specs}
        self.mask_video = (
            MaskVideoWriter(out_dir / "masks.mkv", video.width, video.height, fps) if "masks.mkv" in names else None
        )
        self.mask_zip = MaskZipWriter(out_dir / "masks.zip") if "masks.zip" in names else None
        self.overlay = (
            OverlayWriter(out_dir / "overlay.mp4", video.width, video.height, fps) if "overlay.mp4" in names else None
        )
        self.frames_json = FramesJsonWriter(out_dir / "frames.json") if "frames.json" in names else None

    @property
    def needs_frames(self) -> bool:
        return self.overlay is not None

    @property
    def overlay_codec(self) -> str | None:
        return self.overlay.codec if self.overlay is not None else None

    def _open(self) -> Iterator[Any]:
        return (w for w in (self.mask_video, self.mask_zip, self.overlay, self.frames_json) if w is not None)

    def write(self, tracks: TextIO, frame: tuple[int, np.ndarray] | None) -> None:
        line = tracks.readline()
        if not line:
            raise RuntimeError(f"tracks.jsonl ends after {self.written} frames")
        record = json.loads(line)
        if record["frame_index"] != self.written or (frame is not None and frame[0] != record["source_frame_index"]):
            raise RuntimeError(f"tracks.jsonl is out of step with the plan at frame {self.written}")
        self.written += 1
        height, width = self.video.height, self.video.width
        masks = [(o["id"], rle.decode(o["rle"]["counts"], height, width)) for o in record["objects"]]
        if self.mask_video is not None or self.mask_zip is not None:
            labels = label_mask(masks, height, width)
            if self.mask_video is not None:
                self.mask_video.write(labels)
            if self.mask_zip is not None:
                self.mask_zip.write(record["source_frame_index"], labels)
        if self.overlay is not None:
            assert frame is not None
            drawn = [
                (o["id"], m, tuple(o["box"]), o["present"]) for o, (_, m) in zip(record["objects"], masks, strict=True)
            ]
            self.overlay.write(draw_overlay(frame[1], drawn))
        if self.frames_json is not None:
            self.frames_json.write(_frame_json(record))

    def close(self) -> None:
        for writer in self._open():
            writer.close()

    def abort(self) -> None:
        """Closes whatever is still open (after an error; a no-op after close())."""
        for writer in self._open():
            with contextlib.suppress(Exception):
                writer.close()


def _frame_json(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "frame_index": record["frame_index"],
        "source_frame_index": record["source_frame_index"],
        "time_s": record["time_s"],
        "objects": [
            {
                "id": o["id"],
                "box": o["box"],
                "score": o["score"],
                "present": o["present"],
                "object_score": o["object_score"],
                "kalman_selected": o["kalman_selected"],
            }
            for o in record["objects"]
        ],
    }


def describe_artifact(name: str, overlay_codec: str | None) -> str:
    if name == "masks.mkv":
        return f"{name} (FFV1, lossless)"
    if name == "overlay.mp4":
        return f"{name} ({'H.264' if overlay_codec == CODEC_H264 else 'MPEG-4 Part 2, H.264 unavailable'})"
    return name
