"""The TRACKING stage of the video segmentation job (its stages are in definition.py beside this
module): one prompted object tracked through the sampled frames, into ``tracks.jsonl``.

Tracking follows SAM 2's ``propagate_in_video``: the prompt goes on ``prompt_frame_index`` (an
index into the SAMPLED frames); the frames after it are tracked forward in one session, the
frames before it in reverse order, from the prompt frame, in a second session; the results are
merged by frame index into ``tracks.jsonl`` (one line per processed frame, masks as COCO RLE).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol, TextIO

import grpc
import numpy as np

from framewise.v1 import common_pb2
from server.errors import InvalidInput, ServiceError, TooLarge
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure
from server.jobs.files.durable import private_temp_name
from server.media.video_reader import UnreadableVideo, VideoInfo, read_frames
from server.sam2.prompts import ObjectPrompt
from server.sam2.samurai import SamuraiConfig
from server.sam2.session import TrackingSession
from server.sam2.video_predictor import FrameOutcome, VideoPredictor

__all__ = ["TRACKS_FILE", "Propagation", "PropagationSettings", "decode_frames"]

TRACKS_FILE = "tracks.jsonl"


class PropagationSettings(Protocol):
    """What the tracking stage reads from its job kind's settings (SegmentVideoJob has them)."""

    @property
    def video_predictor(self) -> VideoPredictor: ...

    @property
    def frame_timeout_s(self) -> float: ...

    @property
    def progress_every(self) -> int: ...

    @property
    def reverse_buffer_bytes(self) -> int: ...


class Propagation:
    """One run of the TRACKING stage: two sessions, progress accounting, tracks lines."""

    def __init__(
        self,
        settings: PropagationSettings,
        ctx: JobContext,
        video: VideoInfo,
        plan: list[int],
        prompt: ObjectPrompt,
        percent: tuple[float, float],
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.video = video
        self.plan = plan
        self.prompt = prompt
        # The stage's progress runs from percent[0] to percent[1] as frames are tracked.
        self.percent = percent
        self.done = 0

    async def run(self, source: Path, start: int) -> int:
        """Forward from the prompt frame, then backward, each into its own part file; the two
        merged into tracks.jsonl (replaced). Returns the number of frames tracked."""
        ctx = self.ctx
        forward_part = ctx.workdir / (TRACKS_FILE + ".forward.part")
        backward_part = ctx.workdir / (TRACKS_FILE + ".backward.part")
        try:
            async with ctx.slot("tracking"), _tracking_failures():
                # Lines are small and buffered: writing them on the loop costs less than a hop.
                with await asyncio.to_thread(open, forward_part, "w", encoding="utf-8") as out:
                    await self.forward(source, start, out)
                with await asyncio.to_thread(open, backward_part, "w", encoding="utf-8") as out:
                    if start > 0:
                        await self.backward(source, start, out)
            count = await asyncio.to_thread(_merge_tracks, backward_part, forward_part, ctx.workdir / TRACKS_FILE)
        finally:
            forward_part.unlink(missing_ok=True)
            backward_part.unlink(missing_ok=True)
        if count != len(self.plan):  # pragma: no cover - a bug, never the client's fault
            raise RuntimeError(f"tracks.jsonl has {count} frames, the plan {len(self.plan)}")
        return count

    async def forward(self, source: Path, start: int, out: TextIO) -> None:
        """The prompt frame and every planned frame after it, in order, in one session."""
        session = TrackingSession(config=SamuraiConfig())
        index = start
        async with contextlib.aclosing(decode_frames(source, self.plan[start:], self.video.backend)) as frames:
            async for source_index, bgr in frames:
                outcome = await self._step(session, bgr, index == start)
                out.write(_track_line(index, source_index, self.video.fps, outcome, "forward"))
                index += 1
                await self._count()

    async def backward(self, source: Path, start: int, out: TextIO) -> None:
        """Frames start-1 .. 0 in reverse order, in a fresh session prompted again on the prompt
        frame (its result there duplicates the forward one and is dropped). Decoding only goes
        forwards, so the frames are decoded in blocks that fit the buffer, last block first."""
        session = TrackingSession(config=SamuraiConfig())
        block = max(1, self.settings.reverse_buffer_bytes // (self.video.width * self.video.height * 3))
        end = start + 1  # exclusive; the prompt frame is tracked first
        while end > 0:
            first = max(0, end - block)
            indices = self.plan[first:end]
            frames = await asyncio.to_thread(_decode_list, source, indices, self.video.backend)
            for index, (source_index, bgr) in zip(range(end - 1, first - 1, -1), reversed(frames), strict=True):
                self.ctx.check_cancelled()
                outcome = await self._step(session, bgr, index == start)
                if index != start:
                    out.write(_track_line(index, source_index, self.video.fps, outcome, "backward"))
                    await self._count()
            end = first

    async def _step(self, session: TrackingSession, bgr: np.ndarray, prompted: bool) -> FrameOutcome:
        self.ctx.check_cancelled()
        height, width = bgr.shape[:2]
        image = common_pb2.Image(
            raw=common_pb2.RawFrame(
                width=width, height=height, pixel_format=common_pb2.PIXEL_FORMAT_BGR8, data=bgr.tobytes()
            )
        )
        prompts = [self.prompt] if prompted else []
        return await self.settings.video_predictor.step(
            session, None, image, prompts, [], timeout_s=self.settings.frame_timeout_s
        )

    async def _count(self) -> None:
        self.done += 1
        total = len(self.plan)
        if self.done % self.settings.progress_every == 0 and self.done < total:
            start, end = self.percent
            await self.ctx.progress(
                start + (end - start) * self.done / total,
                f"tracked {self.done}/{total} frames",
                done=self.done,
                total=total,
            )


def _track_line(index: int, source_index: int, fps: float, outcome: FrameOutcome, direction: str) -> str:
    record = {
        "frame_index": index,
        "source_frame_index": source_index,
        "time_s": round(source_index / fps, 6),
        "direction": direction,
        "objects": [
            {
                "id": o.object_id,
                "box": [float(v) for v in o.box],
                "score": float(o.predicted_iou),
                "present": bool(o.present),
                "object_score": float(o.object_score),
                "kalman_selected": bool(o.kalman_selected),
                "candidate_index": int(o.candidate_index),
                "rle": {"size": [int(o.mask.height), int(o.mask.width)], "counts": o.mask.counts},
            }
            for o in outcome.objects
        ],
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


def _merge_tracks(backward: Path, forward: Path, dest: Path) -> int:
    """Backward lines (written last frame first) reversed, then the forward lines, into ``dest``
    atomically. Returns the number of frames."""
    backward_lines = backward.read_text(encoding="utf-8").splitlines(keepends=True)
    tmp = private_temp_name(dest)
    count = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for line in reversed(backward_lines):
            out.write(line)
            count += 1
        with open(forward, encoding="utf-8") as lines:
            for line in lines:
                out.write(line)
                count += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, dest)
    return count


@contextlib.asynccontextmanager
async def _tracking_failures() -> AsyncIterator[None]:
    """Tracking errors as job failures: a prompt or frame the video predictor rejects is permanent;
    Triton unavailable, a deadline or an interrupted call are recoverable (the stage runs
    again, from its start, in fresh sessions)."""
    try:
        yield
    except UnreadableVideo as exc:
        raise JobFailure.permanent("corrupt_video", f"the video cannot be decoded: {exc}") from None
    except TooLarge as exc:
        raise JobFailure.permanent("frame_too_large", exc.message) from None
    except InvalidInput as exc:
        raise JobFailure.permanent("invalid_input", exc.message) from None
    except TimeoutError as exc:
        raise JobFailure.recoverable("frame_timeout", f"a frame did not finish in time ({exc})") from None
    except ServiceError as exc:
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            kind = "triton_unavailable" if exc.code == grpc.StatusCode.UNAVAILABLE else "frame_timeout"
            raise JobFailure.recoverable(kind, exc.message) from None
        # Triton rejecting a request the orchestrator built is a server-side problem, not input.
        raise JobFailure.permanent("tracking_failed", exc.message, code=exc.code) from None


# ---------------------------------------------------------------------- decoding


async def decode_frames(path: Path, indices: list[int], backend: str) -> AsyncIterator[tuple[int, np.ndarray]]:
    """The planned frames, decoded one ahead in a thread while the caller works on the
    current one. Use it under contextlib.aclosing: the decoder is closed only once its thread is
    done with it (a generator cannot be closed while another thread runs it)."""
    frames = read_frames(path, indices, backend=backend)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="video-decode")
    pending = executor.submit(next, frames, None)
    try:
        while True:
            item = await asyncio.wrap_future(pending)
            if item is None:
                return
            pending = executor.submit(next, frames, None)
            yield item
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            pending.add_done_callback(lambda _done: close())
        executor.shutdown(wait=False)


def _decode_list(path: Path, indices: list[int], backend: str) -> list[tuple[int, np.ndarray]]:
    return list(read_frames(path, indices, backend=backend))
