"""The photo D-ID gets for each person: the DETECTION stage (the persons found, and the one the
request chooses or, with all_persons, every one up to the bound) and the BACKGROUND_REMOVAL
stage (each person's crop matted and put over the requested background, or sent as it is),
with its fallback: graceful degradation to the plain crop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import cv2
import numpy as np

from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import InvalidInput, ServiceError, Unavailable
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure
from server.jobs.files.durable import write_atomically
from server.jobs.kinds.talking_video.inputs import BACKGROUND_FILE
from server.jobs.kinds.talking_video.persons import (
    SKIPPED_BY_CLIENT,
    PersonSlot,
    background_record,
    background_words,
    band,
    persons_text,
    slots,
)
from server.jobs.kinds.talking_video.progress import STAGE_PERCENT, S
from server.pipelines.detection import Detection, DetectionPipeline, DetectOptions
from server.pipelines.matting import PNG_COMPRESSION, MattingPipeline, encode_rgba_png
from server.pipelines.backgrounds import resolve_background
from server.vision.compositing import BackgroundMode, BackgroundSpec, render
from server.vision.persons import PersonChoiceError, select_person
from server.vision.persons import crop_box as _crop_box

__all__ = ["Photos"]

_PERSON = 0  # COCO class id
BAD_BACKGROUND = "bad_background"


class Photos:
    """``detect`` is the DETECTION stage; ``matte`` the BACKGROUND_REMOVAL stage and
    ``matting_failed`` its fallback."""

    def __init__(
        self,
        detection: DetectionPipeline,
        matting: MattingPipeline,
        *,
        crop_margin: float,
        min_person_score: float,
        inference_timeout_s: float,
        max_persons: int,
    ) -> None:
        self.detection = detection
        self.matting = matting
        self.crop_margin = crop_margin
        self.min_person_score = min_person_score
        self.inference_timeout_s = inference_timeout_s
        self.max_persons = max_persons

    # ------------------------------------------------------------------ the DETECTION stage

    async def detect(self, ctx: JobContext) -> None:
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

    # ------------------------------------------------------------------ the BACKGROUND_REMOVAL stage

    async def matte(self, ctx: JobContext) -> None:
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

    async def matting_failed(self, ctx: JobContext, failure: JobFailure) -> bool:
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
# JPEG (names: persons.PersonSlot).
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
