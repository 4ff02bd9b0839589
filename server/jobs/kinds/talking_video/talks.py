"""The D-ID stages of a talking video: DID_UPLOAD (the audio and each person's photo) and
DID_COMPLETE (one talk per person, created once, its id saved the moment it exists so a resumed
job polls that talk instead of paying for a second one; then waited for and downloaded), with
their fallbacks for all_persons: a person whose retries are spent fails alone, the others go on.

D-ID keeps uploads and talks for a limited time, so a job resumed late (or whose talk D-ID lost)
can find its talk gone (404) and its upload URLs refused (400/404 on POST /talks). Neither is the
user's input at fault: the talk stage goes back to the upload stage (uploads what D-ID refused
again, once per stage run) and creates a new talk, never a second live one: a talk is only
forgotten when D-ID says it is gone or ended in failure. A talk that ended in ``error`` is
retried with a new talk (the client never adopts a failed one), never by polling it again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from server.did.client import DIDClient, OnRetry
from server.did.errors import DIDError
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure, from_did_error
from server.jobs.files.durable import write_atomically
from server.jobs.kinds.talking_video.persons import (
    PersonSlot,
    band,
    failure_of,
    persons_text,
    raise_person_failures,
    record_failure,
    slots,
    talks_summary,
)
from server.jobs.kinds.talking_video.progress import STAGE_PERCENT, S

__all__ = ["DIDFactory", "Talks"]

DIDFactory = Callable[[OnRetry], DIDClient]

# What POST /talks answers for upload URLs D-ID no longer has (expired or lost): a 400
# ValidationError naming source_url/audio_url, or a 404 for the upload.
_UPLOADS_REFUSED = frozenset({400, 404})
_AUDIO = "audio"


class Talks:
    """``upload`` is the DID_UPLOAD stage, ``talk`` the DID_COMPLETE stage; ``uploads_gave_up``
    and ``talks_gave_up`` their fallbacks."""

    def __init__(self, did: DIDFactory | None, *, did_poll_interval_s: float, did_wait_timeout_s: float) -> None:
        self.did = did
        self.did_poll_interval_s = did_poll_interval_s
        self.did_wait_timeout_s = did_wait_timeout_s

    async def upload(self, ctx: JobContext) -> None:
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

    async def talk(self, ctx: JobContext) -> None:
        if ctx.request.all_persons:
            await self._all_talks(ctx)
            return
        percent = STAGE_PERCENT[S.JOB_STAGE_DID_PROCESSING]
        await ctx.stage(S.JOB_STAGE_DID_PROCESSING, percent, "D-ID is rendering the video")
        person = PersonSlot(0, 1, ctx.state)
        async with self._did_client(ctx) as did:
            talk_id = ctx.state.get("did_talk_id")
            if not talk_id:
                talk_id = await self._create_talk(ctx, did, person, percent, set())
            video = await self._wait_and_download(ctx, did, person, talk_id)
        await asyncio.to_thread(write_atomically, ctx.workdir / "talk.mp4", video)
        await ctx.stage(
            S.JOB_STAGE_DID_COMPLETE,
            STAGE_PERCENT[S.JOB_STAGE_DID_COMPLETE],
            f"D-ID talk {talk_id} done ({len(video)} bytes)",
            completes=True,
        )

    async def _all_talks(self, ctx: JobContext) -> None:
        """All persons: every talk is created first (its id saved at once), then each is waited
        for in turn, so D-ID renders them side by side rather than one after another."""
        persons = slots(ctx.state, True)
        total = len(persons)
        finished = sum(1 for p in persons if p.failed or p.state.get("video_file"))
        percent = band(S.JOB_STAGE_DID_PROCESSING, S.JOB_STAGE_DID_COMPLETE, STAGE_PERCENT, finished, total)
        todo = [p for p in persons if not p.failed and not p.state.get("video_file")]
        await ctx.stage(S.JOB_STAGE_DID_PROCESSING, percent, f"D-ID is rendering the videos of {persons_text(len(todo))}")
        refreshed: set[str] = set()  # the uploads made again in this run (the audio is shared)
        for person in todo:
            if person.state.get("did_talk_id"):
                continue  # created before a retry or a restart: polled below, never created again
            await ctx.progress(percent, f"{person.prefix}creating the D-ID talk", done=finished, total=total, person=person.number)
            try:
                async with self._did_client(ctx, person) as did:
                    await self._create_talk(ctx, did, person, percent, refreshed)
            except JobFailure as failure:
                await self._person_failed(ctx, person, failure, percent)
                continue
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

    async def _create_talk(
        self, ctx: JobContext, did: DIDClient, person: PersonSlot, percent: float, refreshed: set[str]
    ) -> str:
        """Creates the person's talk (or adopts the live one listed for its uploads) and saves
        its id at once. Upload URLs D-ID refuses, unless they were made in this run, are
        forgotten and made again (back to the upload stage), then the talk is asked for again;
        refused once more, the refusal is final (it is about the files, not their age)."""
        image_key = f"image-{person.number}"
        while True:
            image_url, audio_url = await self._ensure_uploads(ctx, did, person, refreshed)
            try:
                talk_id = await did.create_talk(image_url, audio_url)
            except DIDError as exc:
                if exc.status not in _UPLOADS_REFUSED or {image_key, _AUDIO} <= refreshed:
                    raise
                await ctx.stage(
                    S.JOB_STAGE_DID_UPLOAD,
                    percent,
                    f"{person.prefix}D-ID no longer accepts the uploads (HTTP {exc.status} {exc.kind}: "
                    f"{exc.description}): uploading the photo and audio again",
                    person=person.number,
                )
                if _AUDIO not in refreshed:
                    ctx.state["did_audio_url"] = None
                if image_key not in refreshed:
                    person.state["did_image_url"] = None
                await ctx.save_state()
                await self._ensure_uploads(ctx, did, person, refreshed)
                await ctx.stage(
                    S.JOB_STAGE_DID_PROCESSING, percent, f"{person.prefix}uploaded again; creating a new D-ID talk",
                    person=person.number,
                )
                continue
            person.state["did_talk_id"] = talk_id
            await ctx.save_state()
            return talk_id

    async def _ensure_uploads(
        self, ctx: JobContext, did: DIDClient, person: PersonSlot, refreshed: set[str]
    ) -> tuple[str, str]:
        """The person's photo and the audio as D-ID URLs, uploading the ones the state lacks
        (forgotten after D-ID refused them, possibly before a crash); each upload is saved at once
        and noted in ``refreshed``."""
        if not ctx.state.get("did_audio_url"):
            audio = await asyncio.to_thread((ctx.workdir / ctx.state["audio_file"]).read_bytes)
            url = await did.upload_audio(audio, ctx.state["audio_file"], ctx.state["audio_media_type"])
            await ctx.save_state(did_audio_url=url)
            refreshed.add(_AUDIO)
        if not person.state.get("did_image_url"):
            image = await asyncio.to_thread((ctx.workdir / person.photo_file).read_bytes)
            person.state["did_image_url"] = await did.upload_image(image, person.photo_file, person.photo_media_type)
            await ctx.save_state()
            refreshed.add(f"image-{person.number}")
        return str(person.state["did_image_url"]), str(ctx.state["did_audio_url"])

    async def _wait_and_download(self, ctx: JobContext, did: DIDClient, person: PersonSlot, talk_id: str) -> bytes:
        try:
            talk = await did.wait_for_talk(talk_id, poll_interval_s=self.did_poll_interval_s, timeout_s=self.did_wait_timeout_s)
        except DIDError as exc:
            # Not for a poll that failed (5xx, 429, a timeout, the connection): the talk may
            # still be rendering, and a new one would be paid twice. Only a talk that ended
            # in error/rejected, or one D-ID answers 404 for, is forgotten; the retry's
            # create_talk then adopts a live talk still listed for these uploads (never the
            # failed one), or posts one, going back to the uploads if D-ID refuses them.
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

    async def uploads_gave_up(self, ctx: JobContext, failure: JobFailure) -> bool:
        return await self._persons_gave_up(ctx, failure, completes=None)

    async def talks_gave_up(self, ctx: JobContext, failure: JobFailure) -> bool:
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
