"""Photo + audio -> talking-head video (seeds 001 and 003):

    inputs -> YOLO person detection -> crop -> matting (RGBA; U^2-Netp on CPU, BiRefNet-lite on GPU) -> D-ID upload
           -> create talk -> poll until done -> download into storage

Stages and percents are the seeds' (INITIALIZED 0 ... COMPLETED 100). Each stage leaves what
the next needs in the job's working folder and state, so a restarted server resumes after the
last completed stage; the D-ID talk id is saved the moment the talk exists, so a resumed job
polls that talk instead of paying for a second one.

With ``all_persons`` the same stages run once for the job, and each of them after detection
loops over the persons (server/jobs/talking_persons.py: per-person state, names, failure rule);
the stage_update events are the single person's, the per-person steps are progress_update
events naming the person, and the percents move through each stage's band as persons finish.
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
from server.jobs.talking_persons import (
    SKIPPED_BY_CLIENT,
    PersonSlot,
    background_record,
    background_words,
    band,
    failure_of,
    person_result,
    persons_text,
    raise_person_failures,
    record_failure,
    slots,
    talks_summary,
)
from server.pipelines.matting import PNG_COMPRESSION, MattingPipeline, encode_rgba_png
from server.servicers.backgrounds import background_mode, resolve_background
from server.vision.compositing import BackgroundMode, BackgroundSpec, render
from server.vision.image_header import read_header
from server.vision.persons import PersonChoiceError, select_person
from server.vision.persons import crop_box as _crop_box

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
# The background picture of an uploaded image_upload_id, copied in at the inputs stage: the
# upload may expire while the job waits in the queue or is resumed days later.
BACKGROUND_FILE = "background"
BAD_BACKGROUND = "bad_background"


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
        max_persons: int = 4,
    ) -> None:
        if max_persons < 1:
            raise ValueError(f"max_persons must be >= 1, got {max_persons}")
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
        # Each person of an all_persons video is a billed D-ID talk: the server bounds them.
        self.max_persons = max_persons

    def stages(self) -> Sequence[Stage]:
        return (
            Stage(S.JOB_STAGE_UPLOAD_COMPLETE, self._inputs),
            Stage(S.JOB_STAGE_DETECTION_COMPLETE, self._detect),
            Stage(S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE, self._matte, fallback=self._matting_failed),
            Stage(S.JOB_STAGE_DID_UPLOAD, self._did_upload, fallback=self._uploads_gave_up),
            Stage(S.JOB_STAGE_DID_COMPLETE, self._did_talk, fallback=self._talks_gave_up),
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

    # ------------------------------------------------------------------ stages

    async def _inputs(self, ctx: JobContext) -> None:
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

    async def _detect(self, ctx: JobContext) -> None:
        await ctx.stage(S.JOB_STAGE_DETECTION_RUNNING, STAGE_PERCENT[S.JOB_STAGE_DETECTION_RUNNING], "detecting people")
        image = await asyncio.to_thread((ctx.workdir / "original").read_bytes)
        options = DetectOptions(confidence=self.min_person_score, class_ids=frozenset({_PERSON}))
        async with ctx.slot("detection"), _inference_failures("detection"):
            result = await self.detection.detect(
                common_pb2.Image(encoded=image), options, timeout_s=self.inference_timeout_s
            )
        people = sorted(result.detections, key=lambda d: d.score, reverse=True)
        # "(cached)": the result cache answered (the same photo was detected before), no Triton call.
        found = f"Detected {len(people)} person{'s' if len(people) != 1 else ''}" + (" (cached)" if result.from_cache else "")
        detected: dict[str, Any] = {
            "persons_found": len(people),
            "width": result.width,
            "height": result.height,
            "detector_stand_in": result.model.stand_in,
        }
        if ctx.request.all_persons:
            message = await self._detected_all(ctx, people, result.width, result.height, found, detected)
        else:
            chosen_index, person = _select_person(people, ctx.request.person)
            crop = _crop_box(person.box, result.width, result.height, self.crop_margin)
            await ctx.save_state(
                person_box=list(person.box),
                crop_box=list(crop),
                person_number=chosen_index + 1,
                person_score=float(person.score),
                **detected,
            )
            message = f"{found}, selected person #{chosen_index + 1} (score {person.score:.2f})"
        await ctx.stage(S.JOB_STAGE_DETECTION_COMPLETE, STAGE_PERCENT[S.JOB_STAGE_DETECTION_COMPLETE], message, completes=True)

    async def _detected_all(
        self, ctx: JobContext, people: list[Detection], width: int, height: int, found: str, detected: dict[str, Any]
    ) -> str:
        """Saves the persons an all_persons video is made for (highest score first, bounded)."""
        if not people:
            _select_person(people, ctx.request.person)  # raises no_person_found, as for one person
        limit = ctx.request.max_persons or self.max_persons
        chosen = people[:limit]
        persons = [
            {
                "person": rank,
                "box": list(p.box),
                "score": float(p.score),
                "crop_box": list(_crop_box(p.box, width, height, self.crop_margin)),
            }
            for rank, p in enumerate(chosen, start=1)
        ]
        await ctx.save_state(persons=persons, **detected)
        scores = ", ".join(f"person {rank} (score {p.score:.2f})" for rank, p in enumerate(chosen, start=1))
        if len(chosen) < len(people):
            return f"{found}, making a video for the {len(chosen)} highest-scoring (max_persons {limit}): {scores}"
        return f"{found}, making a video for each: {scores}"

    async def _matte(self, ctx: JobContext) -> None:
        persons = slots(ctx.state, ctx.request.all_persons)
        total = len(persons)
        finished = sum(1 for p in persons if p.many and p.state.get("person_file"))
        running = band(S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE, STAGE_PERCENT, finished, total)
        what = "removing the background" + (f" of {persons_text(total)}" if persons[0].many else "")
        await ctx.stage(S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, running, what)
        image = await asyncio.to_thread((ctx.workdir / "original").read_bytes)
        spec = await self._background(ctx)
        messages = []
        for person in persons:
            if person.many and person.state.get("person_file"):
                continue  # made before a retry or a restart
            if person.many:
                await ctx.progress(running, f"{person.prefix}removing the background", done=finished, total=total, person=person.number)
            try:
                message = await self._matte_one(ctx, image, person, spec)
            except JobFailure as failure:
                raise person.stamp(failure) from None
            messages.append(message)
            if person.many:
                finished += 1
                running = band(S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE, STAGE_PERCENT, finished, total)
                await ctx.progress(running, f"{person.prefix}{message}", done=finished, total=total, person=person.number)
        if persons[0].many:
            message = f"photos made for {persons_text(total)} ({background_words(spec)})"
        else:
            message = messages[0]
        await ctx.stage(
            S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE],
            message,
            completes=True,
        )

    async def _matte_one(self, ctx: JobContext, image: bytes, person: PersonSlot, spec: BackgroundSpec) -> str:
        """Makes the photo D-ID gets for one person; returns what the event says about it."""
        crop = tuple(person.state["crop_box"])
        if spec.mode is BackgroundMode.KEEP:
            if ctx.request.skip_matting:
                await self._plain_crop(ctx, image, crop, SKIPPED_BY_CLIENT, person)
                return "skipped at the client's request (skip_matting): the crop is sent as it is"
            await self._plain_crop(ctx, image, crop, KEEP_NEEDS_NO_MATTE, person)
            return "background kept (BACKGROUND_MODE_KEEP): the crop's original pixels are sent, no matting needed"
        async with ctx.slot("matting"), _inference_failures("background removal"):
            matte = await self.matting.alpha(
                common_pb2.Image(encoded=image), crop, timeout_s=self.inference_timeout_s, image_field="image"
            )
        png = await asyncio.to_thread(_rendered_png, matte.rgb, matte.alpha, spec)
        await asyncio.to_thread(write_atomically, ctx.workdir / person.matted_file, png)
        person.state.update(
            matting_skipped=False, matting_skipped_reason="", matting_stand_in=matte.model.stand_in,
            person_file=person.matted_file, person_media_type="image/png", background=background_record(spec),
        )
        await ctx.save_state()
        done = "background removed" if spec.mode is BackgroundMode.TRANSPARENT else f"background replaced by {background_words(spec)}"
        if matte.from_cache:  # the result cache had this crop's matte: no Triton call
            done += " (cached)"
        return done + (" (matting STAND-IN model: the alpha has no learned meaning)" if matte.model.stand_in else "")

    async def _background(self, ctx: JobContext) -> BackgroundSpec:
        """The requested background, resolved (its picture decoded) for this run of the stage."""
        if ctx.request.skip_matting:
            return BackgroundSpec(BackgroundMode.KEEP)
        uploaded = None
        if ctx.request.background.WhichOneof("image_source") == "image_upload_id":
            uploaded = await asyncio.to_thread((ctx.workdir / BACKGROUND_FILE).read_bytes)
        try:
            return await asyncio.to_thread(
                resolve_background, ctx.request.background, default_mode=BackgroundMode.TRANSPARENT,
                max_pixels=self.matting.max_pixels, uploaded_image=uploaded,
            )
        except ServiceError as exc:  # checked at submit; a server with a lower pixel limit since
            raise JobFailure.permanent(BAD_BACKGROUND, exc.message) from None

    async def _matting_failed(self, ctx: JobContext, failure: JobFailure) -> bool:
        """Seed 003's graceful degradation: background removal failed for good, so the crop goes
        to D-ID as it is, unless the client asked for require_matting. A full disk is not a
        matting problem: the job fails with it, and so does a background picture the server can
        no longer decode (not the matte's fault either). With all persons, the persons matted
        before the failure keep their photos."""
        if ctx.request.require_matting or failure.error_class == jobs_pb2.ERROR_CLASS_RESOURCE:
            return False
        if failure.kind == BAD_BACKGROUND:
            return False
        image = await asyncio.to_thread((ctx.workdir / "original").read_bytes)
        reason = f"background removal failed ({failure.kind}: {failure.description})"
        without = [p for p in slots(ctx.state, ctx.request.all_persons) if not (p.many and p.state.get("person_file"))]
        for person in without:
            await self._plain_crop(ctx, image, tuple(person.state["crop_box"]), reason, person)
        who = f" for person {', '.join(str(p.number) for p in without)}" if without[0].many else ""
        await ctx.stage(
            S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE],
            f"{reason}; continuing without it{who}: the crop is sent as it is (set require_matting to fail instead)",
            completes=True,
        )
        return True

    @staticmethod
    async def _plain_crop(ctx: JobContext, image: bytes, crop: tuple, reason: str, person: PersonSlot) -> None:
        # No alpha to keep: a JPEG (q95) of the crop, ~2 ms to encode and ~5x smaller than a
        # lossless PNG, which took ~30 ms of CPU per job on these machines.
        jpeg = await asyncio.to_thread(_crop_jpeg, image, crop)
        await asyncio.to_thread(write_atomically, ctx.workdir / person.crop_file, jpeg)
        person.state.update(
            matting_skipped=True, matting_skipped_reason=reason, person_file=person.crop_file,
            person_media_type="image/jpeg", background=background_record(BackgroundSpec(BackgroundMode.KEEP)),
        )
        await ctx.save_state()

    async def _did_upload(self, ctx: JobContext) -> None:
        persons = slots(ctx.state, ctx.request.all_persons)
        if not persons[0].many:
            await ctx.stage(S.JOB_STAGE_DID_UPLOAD, STAGE_PERCENT[S.JOB_STAGE_DID_UPLOAD], "uploading the photo and audio to D-ID")
            photo = persons[0]
            image = await asyncio.to_thread((ctx.workdir / photo.photo_file).read_bytes)
            audio = await asyncio.to_thread((ctx.workdir / ctx.state["audio_file"]).read_bytes)
            async with self._did_client(ctx) as did:
                image_url = await did.upload_image(image, photo.photo_file, photo.photo_media_type)
                audio_url = await did.upload_audio(audio, ctx.state["audio_file"], ctx.state["audio_media_type"])
            await ctx.save_state(did_image_url=image_url, did_audio_url=audio_url)
            return
        total = len(persons)
        finished = sum(1 for p in persons if p.failed or p.state.get("did_image_url"))
        percent = band(S.JOB_STAGE_DID_UPLOAD, S.JOB_STAGE_DID_PROCESSING, STAGE_PERCENT, finished, total)
        todo = [p for p in persons if not p.failed and not p.state.get("did_image_url")]
        await ctx.stage(S.JOB_STAGE_DID_UPLOAD, percent, f"uploading the audio and the photos of {persons_text(len(todo))} to D-ID")
        if not ctx.state.get("did_audio_url"):
            audio = await asyncio.to_thread((ctx.workdir / ctx.state["audio_file"]).read_bytes)
            async with self._did_client(ctx) as did:
                audio_url = await did.upload_audio(audio, ctx.state["audio_file"], ctx.state["audio_media_type"])
            await ctx.save_state(did_audio_url=audio_url)
        for person in todo:
            await ctx.progress(percent, f"{person.prefix}uploading the photo to D-ID", done=finished, total=total, person=person.number)
            image = await asyncio.to_thread((ctx.workdir / person.photo_file).read_bytes)
            try:
                async with self._did_client(ctx, person) as did:
                    image_url = await did.upload_image(image, person.photo_file, person.photo_media_type)
            except JobFailure as failure:
                await self._person_failed(ctx, person, failure, percent)
                continue
            person.state.pop("error", None)
            person.state["did_image_url"] = image_url
            await ctx.save_state()
            finished += 1
            percent = band(S.JOB_STAGE_DID_UPLOAD, S.JOB_STAGE_DID_PROCESSING, STAGE_PERCENT, finished, total)
        raise_person_failures(persons)

    async def _did_talk(self, ctx: JobContext) -> None:
        if ctx.request.all_persons:
            await self._did_talks(ctx)
            return
        await ctx.stage(S.JOB_STAGE_DID_PROCESSING, STAGE_PERCENT[S.JOB_STAGE_DID_PROCESSING], "D-ID is rendering the video")
        async with self._did_client(ctx) as did:
            talk_id = ctx.state.get("did_talk_id")
            if not talk_id:
                talk_id = await did.create_talk(ctx.state["did_image_url"], ctx.state["did_audio_url"])
                await ctx.save_state(did_talk_id=talk_id)
            video = await self._wait_and_download(ctx, did, PersonSlot(0, 1, ctx.state), talk_id)
        await asyncio.to_thread(write_atomically, ctx.workdir / "talk.mp4", video)
        await ctx.stage(
            S.JOB_STAGE_DID_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_DID_COMPLETE],
            f"D-ID talk {talk_id} done ({len(video)} bytes)",
            completes=True,
        )

    async def _did_talks(self, ctx: JobContext) -> None:
        """All persons: every talk is created first (its id saved at once), then each is waited
        for in turn, so D-ID renders them side by side rather than one after another."""
        persons = slots(ctx.state, True)
        total = len(persons)
        finished = sum(1 for p in persons if p.failed or p.state.get("video_file"))
        percent = band(S.JOB_STAGE_DID_PROCESSING, S.JOB_STAGE_DID_COMPLETE, STAGE_PERCENT, finished, total)
        todo = [p for p in persons if not p.failed and not p.state.get("video_file")]
        await ctx.stage(S.JOB_STAGE_DID_PROCESSING, percent, f"D-ID is rendering the videos of {persons_text(len(todo))}")
        for person in todo:
            if person.state.get("did_talk_id"):
                continue  # created before a retry or a restart: polled below, never created again
            await ctx.progress(percent, f"{person.prefix}creating the D-ID talk", done=finished, total=total, person=person.number)
            try:
                async with self._did_client(ctx, person) as did:
                    talk_id = await did.create_talk(person.state["did_image_url"], ctx.state["did_audio_url"])
            except JobFailure as failure:
                await self._person_failed(ctx, person, failure, percent)
                continue
            person.state["did_talk_id"] = talk_id
            await ctx.save_state()
        for person in todo:
            talk_id = person.state.get("did_talk_id")
            if not talk_id:
                continue  # its creation failed above
            try:
                async with self._did_client(ctx, person) as did:
                    video = await self._wait_and_download(ctx, did, person, talk_id)
            except JobFailure as failure:
                await self._person_failed(ctx, person, failure, percent)
                continue
            await asyncio.to_thread(write_atomically, ctx.workdir / person.video_file, video)
            person.state.pop("error", None)
            person.state["video_file"] = person.video_file
            await ctx.save_state()
            finished += 1
            percent = band(S.JOB_STAGE_DID_PROCESSING, S.JOB_STAGE_DID_COMPLETE, STAGE_PERCENT, finished, total)
            await ctx.progress(
                percent, f"{person.prefix}D-ID talk {talk_id} done ({len(video)} bytes)", done=finished, total=total,
                person=person.number,
            )
        raise_person_failures(persons)
        await ctx.stage(S.JOB_STAGE_DID_COMPLETE, STAGE_PERCENT[S.JOB_STAGE_DID_COMPLETE], talks_summary(persons), completes=True)

    async def _wait_and_download(self, ctx: JobContext, did: DIDClient, person: PersonSlot, talk_id: str) -> bytes:
        try:
            talk = await did.wait_for_talk(talk_id, poll_interval_s=self.did_poll_interval_s, timeout_s=self.did_wait_timeout_s)
        except DIDError as exc:
            # Not for a poll that failed (5xx, 429, a timeout, the connection): the talk may
            # still be rendering, and a new one would be paid twice. Only a talk that ended
            # in error/rejected, or one D-ID answers 404 for, is forgotten; the retry's
            # create_talk then adopts a talk still listed for these uploads, or posts one.
            if exc.talk_ended or exc.status == 404:
                person.state["did_talk_id"] = None
                await ctx.save_state()
            if exc.status == 404:  # the client calls a 404 permanent; for a saved talk it is not
                raise JobFailure.external(
                    "talk_not_found", f"D-ID answered 404 for talk {talk_id} ({exc.description}); looking it up again"
                ) from exc
            raise
        assert talk.result_url is not None
        return await did.download(talk.result_url)

    async def _person_failed(self, ctx: JobContext, person: PersonSlot, failure: JobFailure, percent: float) -> None:
        """One person's step failed: saved (the other persons go on), and said in an event."""
        person.stamp(failure)
        record_failure(person, failure, ctx.current_stage)
        await ctx.save_state()
        then = "retried after this round" if failure.retryable else "not retried; the other persons go on"
        await ctx.progress(percent, f"{failure.description} ({failure.kind}; {then})", person=person.number)

    async def _uploads_gave_up(self, ctx: JobContext, failure: JobFailure) -> bool:
        return await self._persons_gave_up(ctx, failure, completes=None)

    async def _talks_gave_up(self, ctx: JobContext, failure: JobFailure) -> bool:
        return await self._persons_gave_up(ctx, failure, completes=S.JOB_STAGE_DID_COMPLETE)

    async def _persons_gave_up(self, ctx: JobContext, failure: JobFailure, *, completes: int | None) -> bool:
        """A D-ID stage of an all_persons video ran out of retries (or met a permanent error)
        for some persons: they fail for good and the others go on. When no person is left,
        the job fails with the first person's error. A failure that is not one person's (a
        full disk, a bug) fails the job as it would for one person."""
        if not ctx.request.all_persons or failure.person == 0:
            return False
        persons = slots(ctx.state, True)
        for person in persons:
            if person.retry_pending:
                assert person.error is not None
                person.error["final"] = True
        await ctx.save_state()
        if all(p.failed for p in persons):
            first = failure_of(persons[0])
            raise first
        if completes is not None:
            await ctx.stage(completes, STAGE_PERCENT[completes], talks_summary(persons), completes=True)
        return True

    async def _finalize(self, ctx: JobContext) -> None:
        persons = slots(ctx.state, ctx.request.all_persons)
        message = "storing the video" if not persons[0].many else f"storing the videos of {persons_text(sum(not p.failed for p in persons))}"
        await ctx.stage(S.JOB_STAGE_FINALIZING, STAGE_PERCENT[S.JOB_STAGE_FINALIZING], message)
        for person in persons:
            if not person.failed:
                await ctx.add_artifact(
                    ctx.workdir / person.video_file, name=person.video_artifact, kind=jobs_pb2.ARTIFACT_KIND_TALKING_VIDEO,
                    media_type="video/mp4",
                )
            # Kept for a failed person too: the photo D-ID refused is what the client needs to see.
            await ctx.add_artifact(
                ctx.workdir / person.photo_file,
                name=person.photo_file,
                kind=jobs_pb2.ARTIFACT_KIND_MATTED_IMAGE,
                media_type=person.photo_media_type,
                tier="processed",
            )

    async def response(self, ctx: JobContext) -> jobs_pb2.CreateTalkingVideoResponse:
        artifacts = [artifact_proto(a) for a in await ctx.bus.store.list_artifacts(ctx.name)]
        by_name = {a.name: a for a in artifacts}
        persons = slots(ctx.state, ctx.request.all_persons)
        results = [person_result(p, by_name) for p in persons]
        main = next(r for r in results if r.state == jobs_pb2.JOB_STATE_SUCCEEDED)
        return jobs_pb2.CreateTalkingVideoResponse(
            video=main.video,
            person_box=main.box,
            matting_skipped=main.matting_skipped,
            matting_skipped_reason=main.matting_skipped_reason,
            did_talk_id=main.did_talk_id,
            artifacts=artifacts,
            background=main.background,
            persons=results,
            persons_found=int(ctx.state.get("persons_found", len(results))),
        )

    # ------------------------------------------------------------------ helpers

    @contextlib.asynccontextmanager
    async def _did_client(self, ctx: JobContext, person: PersonSlot | None = None) -> AsyncIterator[DIDClient]:
        """A D-ID client whose retries (429, 5xx, timeouts) each become an error event (naming
        ``person`` with all persons)."""
        assert self.did is not None

        async def on_retry(_attempt: int, error: DIDError, delay_s: float) -> None:
            failure = from_did_error(error)
            await ctx.retrying(person.stamp(failure) if person is not None else failure, delay_s)

        client = self.did(on_retry)
        try:
            yield client
        except DIDError as exc:
            failure = from_did_error(exc)
            raise (person.stamp(failure) if person is not None else failure) from None
        finally:
            await client.aclose()


def _rendered_png(rgb: np.ndarray, alpha: np.ndarray, spec: BackgroundSpec) -> bytes:
    """The person over ``spec``'s background: an RGBA PNG for TRANSPARENT, RGB otherwise."""
    if spec.mode is BackgroundMode.TRANSPARENT:
        return encode_rgba_png(rgb, alpha)
    pixels = render(rgb, alpha, spec)
    ok, png = cv2.imencode(".png", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    assert ok
    return png.tobytes()


def _select_person(people: list[Detection], selector: jobs_pb2.PersonSelector) -> tuple[int, Detection]:
    """(index in score order, detection) of the person the request asks for (the choice itself
    is server.vision.persons', shared with RemoveBackground's crop_person)."""
    which = selector.WhichOneof("selector")
    try:
        chosen = select_person(
            [p.box for p in people],
            index=selector.index if which == "index" else None,
            point=(selector.point.x, selector.point.y) if which == "point" else None,
            field=f"person.{which}" if which in ("index", "point") else "person",
        )
    except PersonChoiceError as error:
        raise JobFailure.permanent(error.kind, str(error)) from None
    return chosen, people[chosen]


# The photo sent to D-ID (and kept as an artifact): the matted RGBA cut-out, or the person
# over a new background, as PNG; with skip_matting or BACKGROUND_MODE_KEEP the plain crop as
# JPEG (names: talking_persons.PersonSlot).
PERSON_JPEG_QUALITY = 95
KEEP_NEEDS_NO_MATTE = "not needed: the background is kept (BACKGROUND_MODE_KEEP), so the crop's original pixels are sent"


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
