"""TrackingService.Track: a bidirectional stream driving one SAMURAI tracking session.

The first request opens (or resumes) a session; each later request is one frame. The handler
reads the next frame only after answering the current one, so a slow server slows the client
through HTTP/2 flow control instead of queueing frames. An error ends the stream with its status
(as gRPC streams do); the session itself survives and can be resumed by id within its idle TTL.

The client may name the session before it opens it: metadata ``x-framewise-session`` (what the
load balancer hashes, so the open and every resume reach the same replica) and/or
``OpenSession.session_key``; the session id is then that key. When the replica drains (SIGTERM),
a stream finishes its current frame, hands its session to the shared store and ends with
UNAVAILABLE: the client resumes with the same key, on whichever replica the balancer picks.

A session belongs to the caller's tenant: a resume by another tenant is NOT_FOUND with the
message of a key nobody holds, and is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2

from framewise.v1 import tracking_service_pb2, tracking_service_pb2_grpc
from server.errors import InvalidInput, ServiceError, Unavailable, shown
from server.metrics import Metrics
from server.quotas.enforcer import QuotaEnforcer
from server.sam2.prompts import ObjectPrompt, prompt_from_proto
from server.sam2.samurai import SamuraiConfig
from server.sam2.session import TrackingSession
from server.sam2.session_registry import SESSION_KEY_METADATA, SessionRegistry, UnknownSession
from server.sam2.video_predictor import FrameOutcome, VideoPredictor
from server.servicers import convert
from server.servicers.tenancy import caller, cross_tenant

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
# A session key travels as an HTTP/2 header value and is echoed in messages and logs: short,
# printable, no spaces. A uuid4 (hex or with dashes) fits, as do most client-made names.
MAX_SESSION_KEY_CHARS = 128
_SESSION_KEY = re.compile(r"[A-Za-z0-9._:~-]+")


class _Draining(Exception):
    """The replica started draining while the stream waited for the client's next frame."""


class TrackingServicer(tracking_service_pb2_grpc.TrackingServiceServicer):
    def __init__(
        self,
        predictor: VideoPredictor,
        sessions: SessionRegistry,
        metrics: Metrics,
        *,
        frame_timeout_s: float,
        quotas: QuotaEnforcer | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        """``quotas``: the tenants' session quotas (None: not limited). ``idle_timeout_s``: how
        long a stream may wait for its client's next message (None: for ever)."""
        self.predictor = predictor
        self.sessions = sessions
        self.metrics = metrics
        self.frame_timeout_s = frame_timeout_s
        self.quotas = quotas
        self.idle_timeout_s = idle_timeout_s

    async def Track(
        self, request_iterator: AsyncIterator[tracking_service_pb2.TrackRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tracking_service_pb2.TrackResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "open":
            raise InvalidInput(
                "the first message of a Track stream must be `open` (a new session or resume_session_id)", "open"
            )
        self.predictor.contract()  # UNAVAILABLE before anything is allocated when the models are not ready
        session = await self._open(first.open, _metadata_key(context))
        await self._take_quota_slot(session, resumed=bool(first.open.resume_session_id))
        ended_cleanly = False
        failed_retryably = False
        requests = aiter(request_iterator)
        drain = asyncio.ensure_future(self.sessions.draining.wait())
        try:
            yield tracking_service_pb2.TrackResponse(
                session=self._opened(session, resumed=bool(first.open.resume_session_id))
            )
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        request = await _next_request(requests, drain)
                except _Draining:
                    await self._hand_off(session)
                except TimeoutError:
                    raise self._idle(session) from None
                if request is None:
                    break
                if request.WhichOneof("message") != "frame":
                    raise InvalidInput("after `open`, every message must be a `frame`", "frame")
                frame = request.frame
                remaining = context.time_remaining()
                timeout = self.frame_timeout_s if remaining is None else min(self.frame_timeout_s, remaining)
                outcome = await self.predictor.step(
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
            drain.cancel()
            # A stream that ends normally releases its session unless asked to keep it; a broken
            # one (error, cancel, disconnect) leaves it resumable for the idle TTL, as long as it
            # has tracked something worth resuming, or was told to retry (Triton down, a
            # deadline): a failed frame is undone, so the session is as before that frame.
            broken_with_state = not ended_cleanly and (session.next_frame_index > 0 or failed_retryably)
            keep = broken_with_state or first.open.keep_on_close
            self.sessions.detach(session, keep=keep)
            if not keep and self.quotas is not None:
                # A kept session keeps its quota slot until it expires (the slot renewal then
                # frees it); a released one frees it now.
                self.quotas.release_session_soon(session.tenant, session.session_id)

    async def _take_quota_slot(self, session: TrackingSession, *, resumed: bool) -> None:
        """One of the tenant's session slots, counted over every replica (the same session
        resumed holds the slot it had). Checked after the registry took the session, so the
        slot is taken under its final id; a refused new session is released at once, a refused
        resume stays resumable."""
        if self.quotas is None or not caller().has_quotas:
            return
        try:
            await self.quotas.acquire_session(session.tenant, session.session_id)
        except BaseException:
            self.sessions.detach(session, keep=resumed)
            raise

    def _idle(self, session: TrackingSession) -> ServiceError:
        """The client sent nothing for idle_timeout_s: the stream ends, so that a stream that
        only opened cannot hold a session (and its tenant's quota slot) for ever. A session
        that tracked frames stays resumable for its idle TTL; one that tracked none is released."""
        key = shown(session.session_id)
        after = (
            f"tracking session {key} is kept for {self.sessions.idle_ttl_s:.0f} s: resume it (resume_session_id {key})"
            if session.next_frame_index > 0
            else f"tracking session {key} tracked no frame and was released: open a new one when frames are ready"
        )
        return ServiceError(
            f"the Track stream received no message for {self.idle_timeout_s:g} s (--track-idle-timeout); {after}",
            code=grpc.StatusCode.ABORTED,
        )

    async def _open(self, request: tracking_service_pb2.OpenSession, metadata_key: str | None) -> TrackingSession:
        key = _session_key(request, metadata_key)
        tenant = caller().tenant
        if request.resume_session_id:
            if key is not None and key != request.resume_session_id:
                raise InvalidInput(
                    f"resume_session_id {shown(request.resume_session_id)} differs from the session key {shown(key)}; "
                    "a resumed session keeps its key: send the same value in both (or only resume_session_id)",
                    "open.resume_session_id",
                )
            try:
                return await self.sessions.resume(request.resume_session_id, tenant=tenant)
            except UnknownSession as exc:
                if exc.other_tenant:
                    cross_tenant(f"sessions/{request.resume_session_id}")
                raise
        overrides = {name: getattr(request.options, name) for name in _OPTION_FIELDS if request.options.HasField(name)}
        try:
            config = SamuraiConfig(**overrides)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"invalid tracker options: {exc}", "open.options") from exc
        return self.sessions.open(config, key, tenant=tenant)

    async def _hand_off(self, session: TrackingSession) -> NoReturn:
        """The replica drains: the session goes to the shared store, and the stream ends telling
        the client to resume it (on whichever replica the load balancer now picks)."""
        key = shown(session.session_id)
        if await self.sessions.hand_off(session):
            raise Unavailable(
                f"replica {shown(self.sessions.replica_id)} is draining; tracking session {key} was handed off at frame "
                f"{session.next_frame_index}: resume it (resume_session_id {key}, metadata {SESSION_KEY_METADATA}: {key}) "
                "on any replica",
                retry_after_s=0.2,
            )
        raise Unavailable(
            f"replica {shown(self.sessions.replica_id)} is draining and could not hand tracking session {key} off "
            "(no shared store, or it failed); open a new session",
            retry_after_s=0.5,
        )

    def _opened(self, session: TrackingSession, *, resumed: bool) -> tracking_service_pb2.SessionOpened:
        contract = self.predictor.contract()
        return tracking_service_pb2.SessionOpened(
            session_id=session.session_id,
            resumed=resumed,
            next_frame_index=session.next_frame_index,
            object_ids=sorted(session.objects),
            idle_ttl=duration_pb2.Duration(seconds=int(self.sessions.idle_ttl_s)),
            models=[convert.model_ref(spec) for spec in contract.specs.values()],
        )


async def _next_request(
    requests: AsyncIterator[tracking_service_pb2.TrackRequest], drain: asyncio.Future[object]
) -> tracking_service_pb2.TrackRequest | None:
    """The next request (None at the end of the stream); _Draining as soon as the replica drains
    while the client has not sent one: a stream waiting for frames must neither hold the drain up
    nor lose its session."""
    if drain.done():
        raise _Draining
    read: asyncio.Future[tracking_service_pb2.TrackRequest | None] = asyncio.ensure_future(anext(requests, None))
    try:
        await asyncio.wait((read, drain), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the stream itself was cancelled: leave no read behind
        read.cancel()
        raise
    if read.done():
        return read.result()
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await read
    raise _Draining


def _metadata_key(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_KEY_METADATA:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def _session_key(request: tracking_service_pb2.OpenSession, metadata_key: str | None) -> str | None:
    """The client's session key (field and/or metadata, which must agree), checked; None if unset."""
    field_key = request.session_key or None
    if field_key is not None and metadata_key is not None and field_key != metadata_key:
        raise InvalidInput(
            f"open.session_key {shown(field_key)} differs from the metadata {SESSION_KEY_METADATA} {shown(metadata_key)}; "
            "send one key (the load balancer routes by the metadata)",
            "open.session_key",
        )
    key = field_key if field_key is not None else metadata_key
    if key is None:
        return None
    if len(key) > MAX_SESSION_KEY_CHARS or not _SESSION_KEY.fullmatch(key):
        raise InvalidInput(
            f"session key {shown(key)} must be 1 to {MAX_SESSION_KEY_CHARS} characters of letters, digits and . _ : ~ - "
            "(a uuid4 fits)",
            "open.session_key",
        )
    return key


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
