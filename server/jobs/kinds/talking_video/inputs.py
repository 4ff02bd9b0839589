"""What a talking video starts from: the submit-time checks of a CreateTalkingVideoRequest, its
sources (bytes in the request, or uploads), and the UPLOAD_COMPLETE stage that copies them into
the job's working folder (an upload may expire while the job waits or is resumed days later).

Everything that can be known before queueing fails the submit RPC itself, with the field named.
"""

from __future__ import annotations

import asyncio
from typing import Any

from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import InvalidInput, ServiceError
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure
from server.jobs.files.durable import write_atomically
from server.jobs.files.uploads import UploadError, UploadStore, upload_status
from server.jobs.kinds.talking_video.progress import STAGE_PERCENT, S
from server.media.audio import NotAudio, check_audio
from server.pipelines.matting import MattingPipeline
from server.pipelines.backgrounds import background_mode, resolve_background
from server.vision.compositing import BackgroundMode
from server.vision.image_header import read_header

__all__ = ["BACKGROUND_FILE", "Inputs"]

# The background picture of an uploaded image_upload_id, copied in at the inputs stage: the
# upload may expire while the job waits in the queue or is resumed days later.
BACKGROUND_FILE = "background"


class Inputs:
    """The request's sources and their checks; ``store`` is the UPLOAD_COMPLETE stage."""

    def __init__(
        self,
        uploads: UploadStore,
        matting: MattingPipeline,
        *,
        max_image_bytes: int,
        max_audio_bytes: int,
        max_persons: int,
    ) -> None:
        self.uploads = uploads
        # Its pixel bound is the background picture's too.
        self.matting = matting
        self.max_image_bytes = max_image_bytes
        self.max_audio_bytes = max_audio_bytes
        self.max_persons = max_persons

    # ------------------------------------------------------------------ submit-time checks

    async def validate(self, request: Any) -> None:
        """The request's own checks: its sources, persons and background (the pipeline checks
        that D-ID is configured first)."""
        if request.skip_matting and request.require_matting:
            raise InvalidInput("skip_matting and require_matting contradict each other; set one", "require_matting")
        image = await self._image_bytes(request)
        header = read_header(image)
        if header is None:
            raise InvalidInput("the image is not a JPEG, PNG or WebP file", _image_field(request))
        audio = await self._audio_bytes(request)
        try:
            await asyncio.to_thread(check_audio, audio)
        except NotAudio as exc:
            raise InvalidInput(f"audio: {exc}", _audio_field(request)) from None
        self._validate_persons(request)
        selector = request.person.WhichOneof("selector")
        if selector == "index" and request.person.index < 0:
            raise InvalidInput(f"person.index must be >= 0, got {request.person.index}", "person.index")
        if selector == "point":
            x, y = request.person.point.x, request.person.point.y
            if not (0 <= x <= header.width and 0 <= y <= header.height):
                raise InvalidInput(f"person.point ({x}, {y}) is outside the {header.width}x{header.height} photo", "person.point")
        await self._validate_background(request)

    def _validate_persons(self, request: Any) -> None:
        if not request.all_persons:
            if request.max_persons:
                raise InvalidInput("max_persons applies to all_persons; set all_persons or leave max_persons at 0", "max_persons")
            return
        if request.HasField("person"):
            raise InvalidInput(
                "all_persons makes a video for every detected person: leave person unset (or turn all_persons off "
                "to choose one)",
                "person",
            )
        if not 0 <= request.max_persons <= self.max_persons:
            raise InvalidInput(
                f"max_persons must be within 1..{self.max_persons} (this server's limit; 0 means the limit), "
                f"got {request.max_persons}",
                "max_persons",
            )

    async def _validate_background(self, request: Any) -> None:
        """A colour that is not a colour, a picture that is not an image, an upload that is
        missing: refused now, with the field named, not after a queue wait and detection."""
        mode = background_mode(request.background, BackgroundMode.TRANSPARENT)
        chosen = request.background.mode != common_pb2.BACKGROUND_MODE_UNSPECIFIED
        if request.skip_matting and chosen and mode is not BackgroundMode.KEEP:
            raise InvalidInput(
                f"skip_matting sends the crop as it is, but background.mode {common_pb2.BackgroundMode.Name(request.background.mode)} "
                "needs the matte: leave background unset (or BACKGROUND_MODE_KEEP), or drop skip_matting",
                "background.mode",
            )
        if request.require_matting and mode is BackgroundMode.KEEP:
            raise InvalidInput(
                "require_matting asks for a matte, but BACKGROUND_MODE_KEEP uses none (the original pixels are sent); "
                "set one of them",
                "require_matting",
            )
        uploaded = await self._background_upload(request)
        max_pixels = self.matting.max_pixels
        await asyncio.to_thread(
            resolve_background, request.background, default_mode=BackgroundMode.TRANSPARENT, max_pixels=max_pixels,
            uploaded_image=uploaded,
        )

    async def _background_upload(self, request: Any) -> bytes | None:
        if request.background.WhichOneof("image_source") == "image":
            if len(request.background.image.encoded) > self.max_image_bytes:
                raise InvalidInput(
                    f"background.image.encoded is {len(request.background.image.encoded)} bytes; the limit is "
                    f"{self.max_image_bytes}",
                    "background.image.encoded",
                )
            return None
        if request.background.WhichOneof("image_source") != "image_upload_id":
            return None
        return await self._upload_bytes(
            request.background.image_upload_id, "background.image_upload_id", self.max_image_bytes, jobs_pb2.FILE_KIND_IMAGE
        )

    async def _image_bytes(self, request: Any) -> bytes:
        return await self._source_bytes(request, "image", self.max_image_bytes, jobs_pb2.FILE_KIND_IMAGE)

    async def _audio_bytes(self, request: Any) -> bytes:
        return await self._source_bytes(request, "audio", self.max_audio_bytes, jobs_pb2.FILE_KIND_AUDIO)

    async def _source_bytes(self, request: Any, what: str, limit: int, kind: int) -> bytes:
        source = request.WhichOneof(f"{what}_source")
        if source is None:
            raise InvalidInput(f"{what} is missing: set {what} (bytes) or {what}_upload_id (from UploadFile)", what)
        if source != what:
            return await self._upload_bytes(getattr(request, f"{what}_upload_id"), f"{what}_upload_id", limit, kind)
        data = getattr(request, what)
        if not data:
            raise InvalidInput(f"{what} is empty", what)
        if len(data) > limit:
            raise InvalidInput(f"{what} is {len(data)} bytes; the limit is {limit}", what)
        return data

    async def _upload_bytes(self, upload_id: str, field: str, limit: int, kind: int) -> bytes:
        try:
            info = await self.uploads.get(upload_id)
        except UploadError as exc:
            raise upload_status(exc, field) from None
        if info.kind != kind:
            raise InvalidInput(
                f"upload {info.upload_id} is a {jobs_pb2.FileKind.Name(info.kind)}, not a {jobs_pb2.FileKind.Name(kind)}",
                field,
            )
        data = await asyncio.to_thread(info.path.read_bytes)
        if len(data) > limit:
            raise InvalidInput(f"{field}: the upload is {len(data)} bytes; the limit is {limit}", field)
        return data

    # ------------------------------------------------------------------ the UPLOAD_COMPLETE stage

    async def store(self, ctx: JobContext) -> None:
        request = ctx.request
        try:
            image = await self._image_bytes(request)
            audio = await self._audio_bytes(request)
            background = await self._background_upload(request)
        except ServiceError as exc:  # an upload expired between submit and run
            raise JobFailure.permanent("input_unavailable", exc.message) from None
        try:
            checked = await asyncio.to_thread(check_audio, audio)
        except NotAudio as exc:
            raise JobFailure.permanent("not_audio", f"audio: {exc}") from None
        audio_file = f"audio.{checked.format}"
        await asyncio.to_thread(write_atomically, ctx.workdir / "original", image)
        await asyncio.to_thread(write_atomically, ctx.workdir / audio_file, audio)
        if background is not None:
            await asyncio.to_thread(write_atomically, ctx.workdir / BACKGROUND_FILE, background)
        await ctx.save_state(audio_file=audio_file, audio_media_type=checked.media_type)
        duration = f" ({checked.duration_s:.1f} s of audio)" if checked.duration_s else ""
        await ctx.stage(
            S.JOB_STAGE_UPLOAD_COMPLETE, STAGE_PERCENT[S.JOB_STAGE_UPLOAD_COMPLETE], f"inputs stored{duration}", completes=True
        )


def _image_field(request: Any) -> str:
    return request.WhichOneof("image_source") or "image"


def _audio_field(request: Any) -> str:
    return request.WhichOneof("audio_source") or "audio"
