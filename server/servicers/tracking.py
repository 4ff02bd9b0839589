"""TrackingService.Track: a bidirectional stream driving one SAMURAI tracking session.

The first request opens (or resumes) a session; each later request is one frame. The handler
reads the next frame only after answering the current one, so a slow server slows the client
through HTTP/2 flow control instead of queueing frames. An error ends the stream with its status
(as gRPC streams do); the session itself survives and can be resumed by id within its idle TTL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from framewise.v1 import tracking_service_pb2, tracking_service_pb2_grpc
from server.errors import InvalidInput, ServiceError
from server.metrics import Metrics
from server.pipelines.prompts import ObjectPrompt, prompt_from_proto
from server.pipelines.sessions import SessionRegistry
from server.pipelines.tracking import FrameOutcome, TrackingEngine, TrackingSession
from server.servicers import convert
from server.tracking import SamuraiConfig

# Failures after which the client is told to retry: the session must still be there to resume.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_OPTION_FIELDS = (
    "kf_score_weight",
    "stable_frames_threshold",
    "stable_ious_threshold",
    "memory_bank_iou_threshold",
    "memory_bank_obj_score_threshold",
    "memory_bank_kf_score_threshold",
)


class TrackingServicer(tracking_service_pb2_grpc.TrackingServiceServicer):
    def __init__(
        self, engine: TrackingEngine, sessions: SessionRegistry, metrics: Metrics, *, frame_timeout_s: float
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.metrics = metrics
        self.frame_timeout_s = frame_timeout_s

    async def Track(
        self, request_iterator: AsyncIterator[tracking_service_pb2.TrackRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tracking_service_pb2.TrackResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "open":
            raise InvalidInput(
                "the first message of a Track stream must be `open` (a new session or resume_session_id)", "open"
            )
        self.engine.contract()  # UNAVAILABLE before anything is allocated when the models are not ready
        session = self._open(first.open)
        ended_cleanly = False
        failed_retryably = False
        try:
            yield tracking_service_pb2.TrackResponse(
                session=self._opened(session, resumed=bool(first.open.resume_session_id))
            )
            async for request in request_iterator:
                if request.WhichOneof("message") != "frame":
                    raise InvalidInput("after `open`, every message must be a `frame`", "frame")
                frame = request.frame
                remaining = context.time_remaining()
                timeout = self.frame_timeout_s if remaining is None else min(self.frame_timeout_s, remaining)
                outcome = await self.engine.step(
                    session,
                    frame.frame_index,
                    frame.image,
                    _prompts(frame),
                    list(frame.remove_object_ids),
                    timeout_s=timeout,
                )
                self.metrics.tracking_frame_bytes.observe(outcome.triton_bytes)
                self.sessions.report(session)
                yield tracking_service_pb2.TrackResponse(frame=_frame_result(outcome))
            ended_cleanly = True
        except ServiceError as exc:
            failed_retryably = exc.code in _RETRYABLE
            raise
        finally:
            # A stream that ends normally releases its session unless asked to keep it; a broken
            # one (error, cancel, disconnect) leaves it resumable for the idle TTL, as long as it
            # has tracked something worth resuming, or was told to retry (Triton down, a
            # deadline): a failed frame is undone, so the session is as before that frame.
            broken_with_state = not ended_cleanly and (session.next_frame_index > 0 or failed_retryably)
            self.sessions.detach(session, keep=broken_with_state or first.open.keep_on_close)

    def _open(self, request: tracking_service_pb2.OpenSession) -> TrackingSession:
        if request.resume_session_id:
            return self.sessions.resume(request.resume_session_id)
        overrides = {name: getattr(request.options, name) for name in _OPTION_FIELDS if request.options.HasField(name)}
        try:
            config = SamuraiConfig(**overrides)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"invalid tracker options: {exc}", "open.options") from exc
        return self.sessions.open(config)

    def _opened(self, session: TrackingSession, *, resumed: bool) -> tracking_service_pb2.SessionOpened:
        contract = self.engine.contract()
        return tracking_service_pb2.SessionOpened(
            session_id=session.session_id,
            resumed=resumed,
            next_frame_index=session.next_frame_index,
            object_ids=sorted(session.objects),
            idle_ttl=duration_pb2.Duration(seconds=int(self.sessions.idle_ttl_s)),
            models=[convert.model_ref(spec) for spec in contract.specs.values()],
        )


def _prompts(frame: tracking_service_pb2.TrackFrame) -> list[ObjectPrompt]:
    return [
        prompt_from_proto(p.object_id, p.box if p.HasField("box") else None, list(p.points), "frame.prompts.")
        for p in frame.prompts
    ]


def _frame_result(outcome: FrameOutcome) -> tracking_service_pb2.FrameResult:
    result = tracking_service_pb2.FrameResult(
        frame_index=outcome.frame_index,
        triton_bytes=outcome.triton_bytes,
        timings=convert.timings(outcome.timings_ms),
    )
    for obj in outcome.objects:
        result.objects.add(
            object_id=obj.object_id,
            mask=obj.mask,
            box=convert.box(obj.box),
            predicted_iou=obj.predicted_iou,
            present=obj.present,
            object_score=obj.object_score,
            kalman_selected=obj.kalman_selected,
            candidate_index=obj.candidate_index,
        )
    return result
