"""Video segmentation job: track one prompted object through a whole video with
SAMURAI over the SAM 2 parts on Triton, then write mask, overlay and per-frame JSON artifacts.

Stages (checkpoint, percent of its stage event)::

    UPLOAD_COMPLETE    5   source resolved (an upload is hard-linked into the working folder),
                           probed, sampling plan saved to the state
    DECODING          10   the first frame decodes; says how many frames at what rate
    TRACKING          15 -> 85   progress every ``progress_every`` frames (done / total)
    WRITING_ARTIFACTS 90 -> 95   masks.mkv, masks.zip, overlay.mp4, frames.json
    FINALIZING        95   (the executor then emits COMPLETED 100)

The tracking stage (forward from the prompt frame, then backward, into ``tracks.jsonl``, as SAM
2's ``propagate_in_video``) is in propagation.py beside this module; the artifacts stage (from
that file only, so they can be written again after a crash without tracking again) is in
artifacts.py. Every stage starts from scratch and replaces its outputs, so a stage cut off
half-way can simply run again.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import InvalidInput, ServiceError, TooLarge
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure
from server.jobs.engine.definition import Stage
from server.jobs.files.artifacts import artifact_proto
from server.jobs.files.durable import fsync_path
from server.jobs.files.uploads import UploadError, UploadInfo, UploadStore, resolve_server_path, upload_status
from server.jobs.kinds.segment_video.artifacts import ARTIFACTS, ArtifactSpec, describe_artifact, write_artifacts
from server.jobs.kinds.segment_video.propagation import Propagation
from server.media.video_reader import (
    UnreadableVideo,
    VideoInfo,
    check_first_frame,
    import_av,
    plan_fps,
    probe_video,
    sampling_plan,
)
from server.sam2.prompts import ObjectPrompt, check_inside, prompt_from_proto
from server.sam2.video_predictor import VideoPredictor

__all__ = ["STAGE_PERCENT", "SegmentVideoJob"]

S = jobs_pb2.JobStage
A = jobs_pb2.ArtifactKind
STAGE_PERCENT: dict[int, float] = {
    S.JOB_STAGE_UPLOAD_COMPLETE: 5,
    S.JOB_STAGE_DECODING: 10,
    S.JOB_STAGE_TRACKING: 15,
    S.JOB_STAGE_WRITING_ARTIFACTS: 90,
    S.JOB_STAGE_FINALIZING: 95,
}
_TRACKING_END = 85.0

# The object id of the single prompted object (frames.json "id", mask value 255).
OBJECT_ID = 1
_SOURCE_LINK = "source"
_BY_KIND = {spec.kind: spec for spec in ARTIFACTS}


@dataclass(frozen=True)
class _Inspected:
    """A request checked against its video."""

    path: Path
    field: str  # "upload_id" or "server_path"
    upload: UploadInfo | None
    video: VideoInfo
    plan: list[int]
    prompt: ObjectPrompt


class SegmentVideoJob:
    kind = jobs_pb2.JOB_KIND_SEGMENT_VIDEO
    request_type = jobs_pb2.SegmentVideoRequest
    response_type = jobs_pb2.SegmentVideoResponse

    def __init__(
        self,
        video_predictor: VideoPredictor,
        uploads: UploadStore,
        *,
        media_root: Path | None,
        max_frames: int = 20_000,
        frame_timeout_s: float = 30.0,
        progress_every: int = 10,
        reverse_buffer_bytes: int = 256 << 20,
    ) -> None:
        if max_frames < 1 or progress_every < 1 or frame_timeout_s <= 0 or reverse_buffer_bytes < 1:
            raise ValueError("max_frames, progress_every, frame_timeout_s and reverse_buffer_bytes must be positive")
        self.video_predictor = video_predictor
        self.uploads = uploads
        self.media_root = media_root
        self.max_frames = max_frames
        self.frame_timeout_s = frame_timeout_s
        self.progress_every = progress_every
        # Frames before the prompt are tracked backwards; they are decoded forwards in blocks
        # of at most this many bytes of BGR pixels, each block tracked in reverse.
        self.reverse_buffer_bytes = reverse_buffer_bytes

    def stages(self) -> Sequence[Stage]:
        return (
            Stage(S.JOB_STAGE_UPLOAD_COMPLETE, self._prepare),
            Stage(S.JOB_STAGE_DECODING, self._decode_check),
            Stage(S.JOB_STAGE_TRACKING, self._track),
            Stage(S.JOB_STAGE_WRITING_ARTIFACTS, self._write_artifacts),
            Stage(S.JOB_STAGE_FINALIZING, self._finalize),
        )

    # ------------------------------------------------------------------ submit-time checks

    async def validate(self, request: Any) -> None:
        """Everything that can be known before queueing fails the submit RPC itself: the
        source, the prompt, the sampling parameters, the video (probed) and the prompt's frame."""
        try:
            await self._inspect(request)
        except UnreadableVideo as exc:
            raise InvalidInput(f"the video cannot be used: {exc}", _source_field(request)) from None

    async def _inspect(self, request: Any, tenant: str | None = None) -> _Inspected:
        """Raises ServiceError (InvalidInput, TooLarge, NOT_FOUND) or UnreadableVideo.
        ``tenant``: the job's owner, whose media root a server_path stays in (see _media_root)."""
        self._check_request(request)
        prompt = _prompt(request)
        _check_prompt_shape(prompt)
        path, field, upload = await self._source(request, tenant)
        video = await asyncio.to_thread(probe_video, path)
        plan = sampling_plan(video.fps, video.frame_count, sample_fps=request.sample_fps, max_frames=request.max_frames)
        if not plan:
            raise UnreadableVideo("the video has no frames")
        if len(plan) > self.max_frames:
            raise TooLarge(
                f"the video gives {len(plan)} frames to process ({video.frame_count} frames at {video.fps:.3f} fps); "
                f"this server processes at most {self.max_frames} per job: set max_frames <= {self.max_frames} or a "
                "lower sample_fps",
                "max_frames",
            )
        if video.width * video.height > self.video_predictor.max_pixels:
            raise TooLarge(
                f"the video's frames are {video.width}x{video.height} = {video.width * video.height} pixels; this "
                f"server tracks at most {self.video_predictor.max_pixels} pixels per frame: downscale the video",
                field,
            )
        if request.prompt_frame_index >= len(plan):
            raise InvalidInput(
                f"prompt_frame_index {request.prompt_frame_index} is outside the sampled video: it has {len(plan)} "
                f"frames to process (0..{len(plan) - 1}) with sample_fps {request.sample_fps:g} and max_frames "
                f"{request.max_frames}; the index counts sampled frames, not source frames",
                "prompt_frame_index",
            )
        check_inside(prompt, video.width, video.height, "")
        return _Inspected(path, field, upload, video, plan, prompt)

    def _check_request(self, request: Any) -> None:
        if not math.isfinite(request.sample_fps) or request.sample_fps < 0:
            raise InvalidInput(f"sample_fps must be >= 0 (0: every frame), got {request.sample_fps}", "sample_fps")
        if request.max_frames < 0:
            raise InvalidInput(f"max_frames must be >= 0 (0: no cap), got {request.max_frames}", "max_frames")
        if request.prompt_frame_index < 0:
            raise InvalidInput(
                f"prompt_frame_index must be >= 0, got {request.prompt_frame_index}", "prompt_frame_index"
            )
        for kind in request.artifacts:
            if kind not in _BY_KIND:
                names = ", ".join(A.Name(k) for k in _BY_KIND)
                raise InvalidInput(
                    f"artifacts: {A.Name(kind) if kind in A.values() else kind} is not a video "
                    f"segmentation artifact; choose from {names}",
                    "artifacts",
                )
            if kind == A.ARTIFACT_KIND_MASK_VIDEO and import_av() is None:
                raise InvalidInput(
                    "artifacts: this server cannot write the FFV1 mask video (PyAV is not installed); ask for "
                    "ARTIFACT_KIND_MASK_PNG_ZIP instead",
                    "artifacts",
                )

    async def _source(self, request: Any, tenant: str | None = None) -> tuple[Path, str, UploadInfo | None]:
        which = request.WhichOneof("source")
        if which == "upload_id" and request.upload_id:
            try:
                info = await self.uploads.get(request.upload_id)
            except UploadError as exc:
                raise upload_status(exc, "upload_id") from None
            if info.kind != jobs_pb2.FILE_KIND_VIDEO:
                raise InvalidInput(
                    f"upload {info.upload_id} is a {jobs_pb2.FileKind.Name(info.kind)}, not a FILE_KIND_VIDEO: "
                    "upload the video with header.kind FILE_KIND_VIDEO",
                    "upload_id",
                )
            return info.path, "upload_id", info
        if which == "server_path" and request.server_path:
            try:
                root, relative = _media_root(self.media_root, request.server_path, tenant)
                path = await asyncio.to_thread(resolve_server_path, root, relative)
            except UploadError as exc:
                raise upload_status(exc, "server_path") from None
            return path, "server_path", None
        raise InvalidInput("the video is missing: set upload_id (from UploadFile) or server_path", "upload_id")

    # ------------------------------------------------------------------ stages

    async def _prepare(self, ctx: JobContext) -> None:
        """UPLOAD_COMPLETE: the request checked again against the video as it is now (an upload
        may have expired since the submit); an upload is hard-linked into the working folder so
        the uploads retention cannot pull it from under the job."""
        try:
            inspected = await self._inspect(_request(ctx), ctx.operation.tenant)
        except UnreadableVideo as exc:
            raise JobFailure.permanent("corrupt_video", f"the video cannot be used: {exc}") from None
        except ServiceError as exc:
            kind = "input_unavailable" if exc.code == grpc.StatusCode.NOT_FOUND else "invalid_input"
            raise JobFailure.permanent(kind, exc.message) from None
        source = inspected.path
        if inspected.upload is not None:
            source = ctx.workdir / _SOURCE_LINK
            await asyncio.to_thread(_link_or_copy, inspected.path, source)
        video, plan = inspected.video, inspected.plan
        await ctx.save_state(
            source=str(source),
            video=video.to_dict(),
            plan=plan,
            prompt_frame_index=int(_request(ctx).prompt_frame_index),
            output_fps=plan_fps(video.fps, video.frame_count, len(plan)),
            artifact_names=[spec.name for spec in _requested(_request(ctx))],
        )
        await ctx.stage(
            S.JOB_STAGE_UPLOAD_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_UPLOAD_COMPLETE],
            f"video ready: {video.width}x{video.height}, {video.frame_count} frames at {video.fps:.3f} fps "
            f"({video.duration_s:.1f} s); {len(plan)} frames to process",
            completes=True,
        )

    async def _decode_check(self, ctx: JobContext) -> None:
        """DECODING: the first frame decodes (the file may have changed since it was probed)."""
        video = VideoInfo.from_dict(ctx.state["video"])
        plan: list[int] = ctx.state["plan"]
        await ctx.stage(
            S.JOB_STAGE_DECODING,
            STAGE_PERCENT[S.JOB_STAGE_DECODING],
            f"decoding: {len(plan)} of {video.frame_count} frames to process at {ctx.state['output_fps']:.3f} fps "
            f"(source {video.fps:.3f} fps, {video.width}x{video.height})",
        )
        try:
            frame = await asyncio.to_thread(check_first_frame, Path(ctx.state["source"]), backend=video.backend)
        except UnreadableVideo as exc:
            raise JobFailure.permanent("corrupt_video", f"the video cannot be decoded: {exc}") from None
        if frame.shape[:2] != (video.height, video.width):
            raise JobFailure.permanent(
                "corrupt_video",
                f"the first frame is {frame.shape[1]}x{frame.shape[0]}, the video was probed as "
                f"{video.width}x{video.height}: the file changed after it was submitted; submit it again",
            )

    async def _track(self, ctx: JobContext) -> None:
        """TRACKING: forward from the prompt frame, then backward; tracks.jsonl replaced."""
        video = VideoInfo.from_dict(ctx.state["video"])
        plan: list[int] = ctx.state["plan"]
        start: int = ctx.state["prompt_frame_index"]
        source = Path(ctx.state["source"])
        prompt = _prompt(_request(ctx))
        direction = "forward" if start == 0 else "forward, then backward"
        await ctx.stage(
            S.JOB_STAGE_TRACKING,
            STAGE_PERCENT[S.JOB_STAGE_TRACKING],
            f"tracking {len(plan)} frames from frame {start} ({direction})",
        )
        propagation = Propagation(self, ctx, video, plan, prompt, (STAGE_PERCENT[S.JOB_STAGE_TRACKING], _TRACKING_END))
        count = await propagation.run(source, start)
        await ctx.save_state(tracked_frames=count)
        # The masks are only as good as the SAM 2 parts: say so where the user watches the job.
        stand_in = " with SAM 2 STAND-IN models (the masks have no learned meaning)" if self.video_predictor.contract().stand_in else ""
        await ctx.progress(_TRACKING_END, f"tracked {count}/{len(plan)} frames{stand_in}", done=count, total=len(plan))

    async def _write_artifacts(self, ctx: JobContext) -> None:
        """WRITING_ARTIFACTS: every requested artifact from tracks.jsonl (and the source frames
        for the overlay), written into the working folder, then placed in the videos tier."""
        video = VideoInfo.from_dict(ctx.state["video"])
        plan: list[int] = ctx.state["plan"]
        specs = [spec for spec in ARTIFACTS if spec.name in ctx.state["artifact_names"]]
        await ctx.stage(
            S.JOB_STAGE_WRITING_ARTIFACTS,
            STAGE_PERCENT[S.JOB_STAGE_WRITING_ARTIFACTS],
            f"writing {', '.join(spec.name for spec in specs)} for {len(plan)} frames",
        )
        percent = (STAGE_PERCENT[S.JOB_STAGE_WRITING_ARTIFACTS], STAGE_PERCENT[S.JOB_STAGE_FINALIZING])
        overlay_codec = await write_artifacts(
            ctx, video, plan, specs, progress_every=self.progress_every, percent=percent
        )
        await ctx.save_state(overlay_codec=overlay_codec)

    async def _finalize(self, ctx: JobContext) -> None:
        """FINALIZING: every requested artifact is recorded; the working copy of the source goes."""
        names = {a.name for a in await ctx.bus.store.list_artifacts(ctx.name)}
        missing = [n for n in ctx.state["artifact_names"] if n not in names]
        if missing:  # pragma: no cover - the previous stage records them or fails
            raise RuntimeError(f"artifacts missing after WRITING_ARTIFACTS: {', '.join(missing)}")
        described = [describe_artifact(name, ctx.state.get("overlay_codec")) for name in ctx.state["artifact_names"]]
        await ctx.stage(
            S.JOB_STAGE_FINALIZING,
            STAGE_PERCENT[S.JOB_STAGE_FINALIZING],
            f"{len(described)} artifacts stored: {', '.join(described)}",
        )
        (ctx.workdir / _SOURCE_LINK).unlink(missing_ok=True)

    async def response(self, ctx: JobContext) -> jobs_pb2.SegmentVideoResponse:
        video = VideoInfo.from_dict(ctx.state["video"])
        artifacts = [artifact_proto(a) for a in await ctx.bus.store.list_artifacts(ctx.name)]
        return jobs_pb2.SegmentVideoResponse(
            frames_processed=len(ctx.state["plan"]),
            source_fps=video.fps,
            width=video.width,
            height=video.height,
            artifacts=artifacts,
        )


# ---------------------------------------------------------------------- helpers


def _request(ctx: JobContext) -> jobs_pb2.SegmentVideoRequest:
    return cast(jobs_pb2.SegmentVideoRequest, ctx.request)


def _prompt(request: jobs_pb2.SegmentVideoRequest) -> ObjectPrompt:
    box = request.box if request.HasField("box") else None
    return prompt_from_proto(OBJECT_ID, box, list(request.points), "")


def _requested(request: jobs_pb2.SegmentVideoRequest) -> list[ArtifactSpec]:
    """The artifacts asked for, in ARTIFACTS order; none asked: every one this server can write
    (the FFV1 mask video needs PyAV)."""
    if request.artifacts:
        kinds = set(request.artifacts)
        return [spec for spec in ARTIFACTS if spec.kind in kinds]
    have_av = import_av() is not None
    return [spec for spec in ARTIFACTS if have_av or spec.kind != A.ARTIFACT_KIND_MASK_VIDEO]


def _check_prompt_shape(prompt: ObjectPrompt) -> None:
    """What can be said about the prompt before the video's size is known."""
    if prompt.box is None and not prompt.points:
        raise InvalidInput("a prompt is needed on the prompt frame: set box and/or points", "box")
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
        if not all(math.isfinite(v) for v in prompt.box):
            raise InvalidInput(f"box ({x1}, {y1}, {x2}, {y2}) is not made of finite numbers (NaN or infinity)", "box")
        if not (x2 > x1 and y2 > y1):
            raise InvalidInput(
                f"box ({x1}, {y1}, {x2}, {y2}) has zero or negative area: x2 > x1 and y2 > y1 are required", "box"
            )
    if not all(math.isfinite(x) and math.isfinite(y) for x, y, _ in prompt.points):
        raise InvalidInput("point coordinates must be finite numbers", "points")


def _source_field(request: Any) -> str:
    return request.WhichOneof("source") or "upload_id"


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link (same file system: free, and it survives the upload's deletion), else a copy."""
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        part = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, part)
        fsync_path(part)  # the folder itself is synced with the stage's checkpoint
        os.replace(part, dest)


def _media_root(media_root: Path | None, server_path: str, tenant: str | None) -> tuple[Path | None, str]:
    """Where a job's server_path is resolved when the job reads it: ``(root, relative path)``.

    The submit scoped an authenticated tenant's path to ``<tenant>/<path>`` after checking it
    inside ``<media root>/<tenant>/`` (server/servicers/jobs.py). Checking it again only against
    the shared media root when the job runs would let a link swapped in meanwhile (the job may
    wait in the queue) reach another tenant's folder, so the job resolves ``<path>`` inside its
    tenant's folder as the submit did. A path not under the owner's folder is an anonymous
    caller's (authentication off), relative to the root itself."""
    if media_root is None or tenant is None:
        return media_root, server_path
    head, sep, rest = server_path.partition("/")
    if sep and rest and head == tenant:
        return media_root / tenant, rest
    return media_root, server_path
