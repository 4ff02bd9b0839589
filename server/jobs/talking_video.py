"""Photo + audio -> talking-head video (seeds 001 and 003):

    inputs -> YOLO person detection -> crop -> BiRefNet matting (RGBA) -> D-ID upload
           -> create talk -> poll until done -> download into storage

Stages and percents are the seeds' (INITIALIZED 0 ... COMPLETED 100). Each stage leaves what
the next needs in the job's working folder and state, so a restarted server resumes after the
last completed stage; the D-ID talk id is saved the moment the talk exists, so a resumed job
polls that talk instead of paying for a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import cv2
import grpc
import numpy as np

from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.did.client import DIDClient, OnRetry
from server.did.errors import DIDError
from server.errors import InvalidInput, ServiceError, Unavailable
from server.jobs.artifacts import artifact_proto
from server.jobs.context import JobContext
from server.jobs.durable_files import write_atomically
from server.jobs.failures import JobFailure, from_did_error
from server.jobs.pipeline import Stage
from server.jobs.uploads import UploadError, UploadStore, upload_status
from server.media.audio import NotAudio, check_audio
from server.pipelines.detection import Detection, DetectionPipeline, DetectOptions
from server.pipelines.matting import MattingPipeline, encode_rgba_png
from server.vision.image_header import read_header

__all__ = ["STAGE_PERCENT", "TalkingVideoPipeline"]

S = jobs_pb2.JobStage
STAGE_PERCENT: dict[int, float] = {
    S.JOB_STAGE_INITIALIZED: 0,
    S.JOB_STAGE_UPLOAD_COMPLETE: 20,
    S.JOB_STAGE_DETECTION_RUNNING: 25,
    S.JOB_STAGE_DETECTION_COMPLETE: 40,
    S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING: 50,
    S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE: 60,
    S.JOB_STAGE_DID_UPLOAD: 70,
    S.JOB_STAGE_DID_PROCESSING: 75,
    S.JOB_STAGE_DID_COMPLETE: 80,
    S.JOB_STAGE_FINALIZING: 90,
    S.JOB_STAGE_COMPLETED: 100,
}

DIDFactory = Callable[[OnRetry], DIDClient]
_PERSON = 0  # COCO class id


class TalkingVideoPipeline:
    kind = jobs_pb2.JOB_KIND_TALKING_VIDEO
    request_type = jobs_pb2.CreateTalkingVideoRequest
    response_type = jobs_pb2.CreateTalkingVideoResponse

    def __init__(
        self,
        detection: DetectionPipeline,
        matting: MattingPipeline,
        uploads: UploadStore,
        did: DIDFactory | None,
        *,
        max_image_bytes: int = 20 * 1024 * 1024,
        max_audio_bytes: int = 20 * 1024 * 1024,
        crop_margin: float = 0.15,
        min_person_score: float = 0.25,
        inference_timeout_s: float = 60.0,
        did_poll_interval_s: float = 2.0,
        did_wait_timeout_s: float = 600.0,
    ) -> None:
        self.detection = detection
        self.matting = matting
        self.uploads = uploads
        self.did = did
        self.max_image_bytes = max_image_bytes
        self.max_audio_bytes = max_audio_bytes
        self.crop_margin = crop_margin
        self.min_person_score = min_person_score
        self.inference_timeout_s = inference_timeout_s
        self.did_poll_interval_s = did_poll_interval_s
        self.did_wait_timeout_s = did_wait_timeout_s

    def stages(self) -> Sequence[Stage]:
        return (
            Stage(S.JOB_STAGE_UPLOAD_COMPLETE, self._inputs),
            Stage(S.JOB_STAGE_DETECTION_COMPLETE, self._detect),
            Stage(S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE, self._matte, fallback=self._matting_failed),
            Stage(S.JOB_STAGE_DID_UPLOAD, self._did_upload),
            Stage(S.JOB_STAGE_DID_COMPLETE, self._did_talk),
            Stage(S.JOB_STAGE_FINALIZING, self._finalize),
        )

    # ------------------------------------------------------------------ submit-time checks

    async def validate(self, request: Any) -> None:
        """Everything that can be known before queueing fails the submit RPC itself."""
        if self.did is None:
            raise ServiceError(
                "talking videos need D-ID: start the server with FRAMEWISE_DID_API_KEY (or --did-url for the "
                "local emulator)",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
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
        selector = request.person.WhichOneof("selector")
        if selector == "index" and request.person.index < 0:
            raise InvalidInput(f"person.index must be >= 0, got {request.person.index}", "person.index")
        if selector == "point":
            x, y = request.person.point.x, request.person.point.y
            if not (0 <= x <= header.width and 0 <= y <= header.height):
                raise InvalidInput(f"person.point ({x}, {y}) is outside the {header.width}x{header.height} photo", "person.point")

    async def _image_bytes(self, request: Any) -> bytes:
        return await self._source_bytes(request, "image", self.max_image_bytes, jobs_pb2.FILE_KIND_IMAGE)

    async def _audio_bytes(self, request: Any) -> bytes:
        return await self._source_bytes(request, "audio", self.max_audio_bytes, jobs_pb2.FILE_KIND_AUDIO)

    async def _source_bytes(self, request: Any, what: str, limit: int, kind: int) -> bytes:
        source = request.WhichOneof(f"{what}_source")
        if source is None:
            raise InvalidInput(f"{what} is missing: set {what} (bytes) or {what}_upload_id (from UploadFile)", what)
        if source == what:
            data = getattr(request, what)
            if not data:
                raise InvalidInput(f"{what} is empty", what)
        else:
            field = f"{what}_upload_id"
            try:
                info = await self.uploads.get(getattr(request, field))
            except UploadError as exc:
                raise upload_status(exc, field) from None
            if info.kind != kind:
                raise InvalidInput(
                    f"upload {info.upload_id} is a {jobs_pb2.FileKind.Name(info.kind)}, not a {jobs_pb2.FileKind.Name(kind)}",
                    field,
                )
            data = await asyncio.to_thread(info.path.read_bytes)
        if len(data) > limit:
            raise InvalidInput(f"{what} is {len(data)} bytes; the limit is {limit}", what)
        return data

    # ------------------------------------------------------------------ stages

    async def _inputs(self, ctx: JobContext) -> None:
        request = ctx.request
        try:
            image = await self._image_bytes(request)
            audio = await self._audio_bytes(request)
        except ServiceError as exc:  # an upload expired between submit and run
            raise JobFailure.permanent("input_unavailable", exc.message) from None
        try:
            checked = await asyncio.to_thread(check_audio, audio)
        except NotAudio as exc:
            raise JobFailure.permanent("not_audio", f"audio: {exc}") from None
        audio_file = f"audio.{checked.format}"
        await asyncio.to_thread(write_atomically, ctx.workdir / "original", image)
        await asyncio.to_thread(write_atomically, ctx.workdir / audio_file, audio)
        await ctx.save_state(audio_file=audio_file, audio_media_type=checked.media_type)
        duration = f" ({checked.duration_s:.1f} s of audio)" if checked.duration_s else ""
        await ctx.stage(
            S.JOB_STAGE_UPLOAD_COMPLETE, STAGE_PERCENT[S.JOB_STAGE_UPLOAD_COMPLETE], f"inputs stored{duration}", completes=True
        )

    async def _detect(self, ctx: JobContext) -> None:
        await ctx.stage(S.JOB_STAGE_DETECTION_RUNNING, STAGE_PERCENT[S.JOB_STAGE_DETECTION_RUNNING], "detecting people")
        image = await asyncio.to_thread((ctx.workdir / "original").read_bytes)
        options = DetectOptions(confidence=self.min_person_score, class_ids=frozenset({_PERSON}))
        async with ctx.slot("detection"), _inference_failures("detection"):
            result = await self.detection.detect(
                common_pb2.Image(encoded=image), options, timeout_s=self.inference_timeout_s
            )
        people = sorted(result.detections, key=lambda d: d.score, reverse=True)
        chosen_index, person = _select_person(people, ctx.request.person)
        crop = _crop_box(person.box, result.width, result.height, self.crop_margin)
        await ctx.save_state(
            person_box=list(person.box),
            crop_box=list(crop),
            persons_found=len(people),
            width=result.width,
            height=result.height,
            detector_stand_in=result.model.stand_in,
        )
        message = (
            f"Detected {len(people)} person{'s' if len(people) != 1 else ''}, selected person #{chosen_index + 1} "
            f"(score {person.score:.2f})"
        )
        await ctx.stage(S.JOB_STAGE_DETECTION_COMPLETE, STAGE_PERCENT[S.JOB_STAGE_DETECTION_COMPLETE], message, completes=True)

    async def _matte(self, ctx: JobContext) -> None:
        await ctx.stage(
            S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, STAGE_PERCENT[S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING], "removing the background"
        )
        image = await asyncio.to_thread((ctx.workdir / "original").read_bytes)
        crop = tuple(ctx.state["crop_box"])
        if ctx.request.skip_matting:
            await self._plain_crop(ctx, image, crop, SKIPPED_BY_CLIENT)
            message = "skipped at the client's request (skip_matting): the crop is sent as it is"
        else:
            async with ctx.slot("matting"), _inference_failures("background removal"):
                matte = await self.matting.alpha(
                    common_pb2.Image(encoded=image), crop, timeout_s=self.inference_timeout_s, image_field="image"
                )
            png = await asyncio.to_thread(encode_rgba_png, matte.rgb, matte.alpha)
            await asyncio.to_thread(write_atomically, ctx.workdir / PERSON_PNG[0], png)
            await ctx.save_state(matting_skipped=False, matting_skipped_reason="", matting_stand_in=matte.model.stand_in,
                                 person_file=PERSON_PNG[0], person_media_type=PERSON_PNG[1])
            message = "background removed" + (" (BiRefNet STAND-IN model: the alpha has no learned meaning)" if matte.model.stand_in else "")
        await ctx.stage(
            S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE],
            message,
            completes=True,
        )

    async def _matting_failed(self, ctx: JobContext, failure: JobFailure) -> bool:
        """Seed 003's graceful degradation: background removal failed for good, so the crop goes
        to D-ID as it is, unless the client asked for require_matting. A full disk is not a
        matting problem: the job fails with it."""
        if ctx.request.require_matting or failure.error_class == jobs_pb2.ERROR_CLASS_RESOURCE:
            return False
        image = await asyncio.to_thread((ctx.workdir / "original").read_bytes)
        reason = f"background removal failed ({failure.kind}: {failure.description})"
        await self._plain_crop(ctx, image, tuple(ctx.state["crop_box"]), reason)
        await ctx.stage(
            S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE],
            f"{reason}; continuing without it: the crop is sent as it is (set require_matting to fail instead)",
            completes=True,
        )
        return True

    @staticmethod
    async def _plain_crop(ctx: JobContext, image: bytes, crop: tuple, reason: str) -> None:
        # No alpha to keep: a JPEG (q95) of the crop, ~2 ms to encode and ~5x smaller than a
        # lossless PNG, which took ~30 ms of CPU per job on these machines.
        jpeg = await asyncio.to_thread(_crop_jpeg, image, crop)
        await asyncio.to_thread(write_atomically, ctx.workdir / PERSON_JPEG[0], jpeg)
        await ctx.save_state(matting_skipped=True, matting_skipped_reason=reason,
                             person_file=PERSON_JPEG[0], person_media_type=PERSON_JPEG[1])

    async def _did_upload(self, ctx: JobContext) -> None:
        await ctx.stage(S.JOB_STAGE_DID_UPLOAD, STAGE_PERCENT[S.JOB_STAGE_DID_UPLOAD], "uploading the photo and audio to D-ID")
        person, media_type = _person_file(ctx)
        image = await asyncio.to_thread((ctx.workdir / person).read_bytes)
        audio = await asyncio.to_thread((ctx.workdir / ctx.state["audio_file"]).read_bytes)
        async with self._did_client(ctx) as did:
            image_url = await did.upload_image(image, person, media_type)
            audio_url = await did.upload_audio(audio, ctx.state["audio_file"], ctx.state["audio_media_type"])
        await ctx.save_state(did_image_url=image_url, did_audio_url=audio_url)

    async def _did_talk(self, ctx: JobContext) -> None:
        await ctx.stage(S.JOB_STAGE_DID_PROCESSING, STAGE_PERCENT[S.JOB_STAGE_DID_PROCESSING], "D-ID is rendering the video")
        async with self._did_client(ctx) as did:
            talk_id = ctx.state.get("did_talk_id")
            if not talk_id:
                talk_id = await did.create_talk(ctx.state["did_image_url"], ctx.state["did_audio_url"])
                await ctx.save_state(did_talk_id=talk_id)
            try:
                talk = await did.wait_for_talk(
                    talk_id, poll_interval_s=self.did_poll_interval_s, timeout_s=self.did_wait_timeout_s
                )
            except DIDError as exc:
                # Not for a poll that failed (5xx, 429, a timeout, the connection): the talk may
                # still be rendering, and a new one would be paid twice. Only a talk that ended
                # in error/rejected, or one D-ID answers 404 for, is forgotten; the retry's
                # create_talk then adopts a talk still listed for these uploads, or posts one.
                if exc.talk_ended or exc.status == 404:
                    await ctx.save_state(did_talk_id=None)
                if exc.status == 404:  # the client calls a 404 permanent; for a saved talk it is not
                    raise JobFailure.external(
                        "talk_not_found", f"D-ID answered 404 for talk {talk_id} ({exc.description}); looking it up again"
                    ) from exc
                raise
            assert talk.result_url is not None
            video = await did.download(talk.result_url)
        await asyncio.to_thread(write_atomically, ctx.workdir / "talk.mp4", video)
        await ctx.stage(
            S.JOB_STAGE_DID_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_DID_COMPLETE],
            f"D-ID talk {talk_id} done ({len(video)} bytes)",
            completes=True,
        )

    async def _finalize(self, ctx: JobContext) -> None:
        await ctx.stage(S.JOB_STAGE_FINALIZING, STAGE_PERCENT[S.JOB_STAGE_FINALIZING], "storing the video")
        await ctx.add_artifact(
            ctx.workdir / "talk.mp4", name="talking_video.mp4", kind=jobs_pb2.ARTIFACT_KIND_TALKING_VIDEO, media_type="video/mp4"
        )
        person, media_type = _person_file(ctx)
        await ctx.add_artifact(
            ctx.workdir / person,
            name=person,
            kind=jobs_pb2.ARTIFACT_KIND_MATTED_IMAGE,
            media_type=media_type,
            tier="processed",
        )

    async def response(self, ctx: JobContext) -> jobs_pb2.CreateTalkingVideoResponse:
        artifacts = [artifact_proto(a) for a in await ctx.bus.store.list_artifacts(ctx.name)]
        x1, y1, x2, y2 = ctx.state["person_box"]
        return jobs_pb2.CreateTalkingVideoResponse(
            video=next(a for a in artifacts if a.kind == jobs_pb2.ARTIFACT_KIND_TALKING_VIDEO),
            person_box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2),
            matting_skipped=bool(ctx.state.get("matting_skipped")),
            matting_skipped_reason=ctx.state.get("matting_skipped_reason")
            or (SKIPPED_BY_CLIENT if ctx.state.get("matting_skipped") else ""),
            did_talk_id=ctx.state.get("did_talk_id") or "",
            artifacts=artifacts,
        )

    # ------------------------------------------------------------------ helpers

    @contextlib.asynccontextmanager
    async def _did_client(self, ctx: JobContext) -> AsyncIterator[DIDClient]:
        """A D-ID client whose retries (429, 5xx, timeouts) each become an error event."""
        assert self.did is not None

        async def on_retry(_attempt: int, error: DIDError, delay_s: float) -> None:
            await ctx.retrying(from_did_error(error), delay_s)

        client = self.did(on_retry)
        try:
            yield client
        except DIDError as exc:
            raise from_did_error(exc) from None
        finally:
            await client.aclose()


def _select_person(people: list[Detection], selector: jobs_pb2.PersonSelector) -> tuple[int, Detection]:
    """(index in score order, detection) of the person the request asks for."""
    if not people:
        raise JobFailure.permanent(
            "no_person_found", "no person found in the photo; use a photo in which one person is clearly visible"
        )
    which = selector.WhichOneof("selector")
    if which == "index":
        if selector.index >= len(people):
            raise JobFailure.permanent(
                "person_index_out_of_range",
                f"person.index is {selector.index} but only {len(people)} person(s) were found (indices 0..{len(people) - 1})",
            )
        return selector.index, people[selector.index]
    if which == "point":
        x, y = selector.point.x, selector.point.y
        hits = [(i, p) for i, p in enumerate(people) if p.box[0] <= x <= p.box[2] and p.box[1] <= y <= p.box[3]]
        if not hits:
            raise JobFailure.permanent("no_person_at_point", f"no detected person's box contains person.point ({x}, {y})")
        return min(hits, key=lambda h: _area(h[1].box))
    return max(enumerate(people), key=lambda h: _area(h[1].box))


def _area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def _crop_box(box: tuple[float, float, float, float], width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The person's box grown by ``margin`` of its size on each side, in whole pixels, clamped."""
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    return (
        max(0, int(np.floor(x1 - mx))),
        max(0, int(np.floor(y1 - my))),
        min(width, int(np.ceil(x2 + mx))),
        min(height, int(np.ceil(y2 + my))),
    )


# The photo sent to D-ID (and kept as an artifact): the matted RGBA cut-out as PNG, or with
# skip_matting the plain crop as JPEG. Jobs saved before person_file existed used person.png.
PERSON_PNG = ("person.png", "image/png")
PERSON_JPEG = ("person.jpg", "image/jpeg")
PERSON_JPEG_QUALITY = 95
SKIPPED_BY_CLIENT = "skipped at the client's request (skip_matting)"


def _person_file(ctx: JobContext) -> tuple[str, str]:
    return ctx.state.get("person_file", PERSON_PNG[0]), ctx.state.get("person_media_type", PERSON_PNG[1])


def _crop_jpeg(image: bytes, crop: tuple[int, ...]) -> bytes:
    decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    x1, y1, x2, y2 = crop
    ok, jpeg = cv2.imencode(".jpg", decoded[y1:y2, x1:x2], [cv2.IMWRITE_JPEG_QUALITY, PERSON_JPEG_QUALITY])
    assert ok
    return jpeg.tobytes()


@contextlib.asynccontextmanager
async def _inference_failures(what: str) -> AsyncIterator[None]:
    """Model-call errors as job failures: a bad image is permanent, an unavailable or slow
    model is recoverable (the stage is retried)."""
    try:
        yield
    except InvalidInput as exc:
        raise JobFailure.permanent("not_an_image", f"{what}: {exc.message}") from None
    except (Unavailable, TimeoutError) as exc:
        raise JobFailure.recoverable("model_unavailable", f"{what}: {exc}") from None
    except ServiceError as exc:
        raise JobFailure.recoverable("inference_failed", f"{what}: {exc.message}") from None


def _image_field(request: Any) -> str:
    return request.WhichOneof("image_source") or "image"


def _audio_field(request: Any) -> str:
    return request.WhichOneof("audio_source") or "audio"
