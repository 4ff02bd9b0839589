"""The talking video job: its settings, its stages in order, and what it answers.

    inputs -> YOLO person detection -> crop -> matting (RGBA; U^2-Netp on CPU, BiRefNet-lite on GPU) -> D-ID upload
           -> create talk -> poll until done -> download into storage

Each stage leaves what the next needs in the job's working folder and state, so a restarted
server resumes after the last completed stage. The stages live beside this module: inputs.py
(UPLOAD_COMPLETE, and the submit-time checks), photos.py (DETECTION, BACKGROUND_REMOVAL),
talks.py (DID_UPLOAD, DID_COMPLETE); FINALIZING and the response are here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import ServiceError
from server.jobs.engine.context import JobContext
from server.jobs.engine.definition import Stage
from server.jobs.files.artifacts import artifact_proto
from server.jobs.files.uploads import UploadStore
from server.jobs.kinds.talking_video.inputs import Inputs
from server.jobs.kinds.talking_video.persons import person_result, persons_text, slots
from server.jobs.kinds.talking_video.photos import Photos
from server.jobs.kinds.talking_video.progress import STAGE_PERCENT, S
from server.jobs.kinds.talking_video.talks import DIDFactory, Talks
from server.pipelines.detection import DetectionPipeline
from server.pipelines.matting import MattingPipeline

__all__ = ["TalkingVideoJob"]


class TalkingVideoJob:
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
        # Each person of an all_persons video is a billed D-ID talk: the server bounds them
        # (at submit in inputs, at detection in photos).
        self.did = did
        self.inputs = Inputs(
            uploads, matting, max_image_bytes=max_image_bytes, max_audio_bytes=max_audio_bytes, max_persons=max_persons
        )
        self.photos = Photos(
            detection,
            matting,
            crop_margin=crop_margin,
            min_person_score=min_person_score,
            inference_timeout_s=inference_timeout_s,
            max_persons=max_persons,
        )
        self.talks = Talks(did, did_poll_interval_s=did_poll_interval_s, did_wait_timeout_s=did_wait_timeout_s)

    def stages(self) -> Sequence[Stage]:
        return (
            Stage(S.JOB_STAGE_UPLOAD_COMPLETE, self.inputs.store),
            Stage(S.JOB_STAGE_DETECTION_COMPLETE, self.photos.detect),
            Stage(S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE, self.photos.matte, fallback=self.photos.matting_failed),
            Stage(S.JOB_STAGE_DID_UPLOAD, self.talks.upload, fallback=self.talks.uploads_gave_up),
            Stage(S.JOB_STAGE_DID_COMPLETE, self.talks.talk, fallback=self.talks.talks_gave_up),
            Stage(S.JOB_STAGE_FINALIZING, self._finalize),
        )

    async def validate(self, request: Any) -> None:
        """Everything that can be known before queueing fails the submit RPC itself."""
        if self.did is None:
            raise ServiceError(
                "talking videos need D-ID: start the server with FRAMEWISE_DID_API_KEY (or --did-url for the "
                "local emulator)",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        await self.inputs.validate(request)

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
