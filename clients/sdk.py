"""A small typed async client over the generated framewise.v1 stubs.

    async with FramewiseClient("localhost:50051") as client:
        response = await client.detect(Path("bus.jpg").read_bytes())
        for d in response.detections:
            print(d.label, d.score, d.box.x1, d.box.y1, d.box.x2, d.box.y2)

Long-running jobs (JobService + google.longrunning.Operations):

    async with FramewiseClient("localhost:50051") as client:
        op = await client.create_talking_video(Path("me.jpg"), Path("voice.wav"), skip_matting=True)
        async for event in client.watch(op.name):       # reconnects and resumes by itself
            print(event.sequence, event.WhichOneof("event"))
        done = await client.get_operation(op.name)
        response = operation_result(done)               # CreateTalkingVideoResponse, or raises OperationFailed
        await client.download_artifact(op.name, response.video.name, Path("talk.mp4"))

One video per person in the photo, each over a green background (inside the same `async with`):

        op = await client.create_talking_video(Path("team.jpg"), Path("voice.wav"), all_persons=True, background="#00ff00")
        done = await client.wait_operation(op.name)
        for person in talking_video_persons(done):      # rank, box, state, video, photo, error
            for artifact in person_artifacts(person):   # "person-1.mp4", "person-1-matted.png", ...
                await client.download_artifact(op.name, artifact.name, Path(artifact.name))

The job methods and helpers (operation_result, job_metadata, stage_name, ...) are defined in
clients/jobs_sdk.py and importable from here too.

The raw stubs stay available (client.vision, client.info, client.jobs, client.operations, ...)
for anything not wrapped here.

With authentication and TLS (the key goes as "authorization: Bearer <key>" on every call):

    connection = Connection(api_key=os.environ["FRAMEWISE_API_KEY"], ca_cert=Path("ca.pem"))
    async with FramewiseClient("api.example.com:50051", connection=connection) as client:
        ...
    # mutual TLS: Connection(client_cert=Path("client.pem"), client_key=Path("client.key"), ca_cert=...)
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.backgrounds import BackgroundLike, background_message
from clients.channel import Connection, open_channel
from clients.jobs_sdk import (
    INLINE_LIMIT_BYTES,
    UPLOAD_CHUNK_BYTES,
    BoxLike,
    DownloadResult,
    IntegrityError,
    JobResponse,
    JobsClient,
    OperationFailed,
    PointLike,
    RetryCallback,
    Source,
    StreamBroken,
    _box,
    artifact_kind_name,
    background_fit_name,
    background_mode_name,
    error_class_name,
    is_terminal,
    job_metadata,
    kind_name,
    operation_response,
    operation_result,
    person_artifacts,
    stage_name,
    state_name,
    status_code,
    talking_video_persons,
)
from framewise.v1 import (
    common_pb2,
    info_service_pb2,
    info_service_pb2_grpc,
    jobs_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
    vision_service_pb2,
    vision_service_pb2_grpc,
)

# The job names are defined in clients/jobs_sdk.py and the background short forms in
# clients/backgrounds.py; they stay importable from here.
__all__ = [
    "DEFAULT_ADDRESS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "INLINE_LIMIT_BYTES",
    "UPLOAD_CHUNK_BYTES",
    "BackgroundLike",
    "BoxLike",
    "Connection",
    "DownloadResult",
    "FramewiseClient",
    "IntegrityError",
    "JobResponse",
    "JobsClient",
    "OperationFailed",
    "PointLike",
    "ReconnectCallback",
    "RetryCallback",
    "SESSION_KEY_METADATA",
    "Source",
    "StreamBroken",
    "TrackingInterrupted",
    "artifact_kind_name",
    "background_fit_name",
    "background_message",
    "background_mode_name",
    "error_class_name",
    "is_terminal",
    "job_metadata",
    "kind_name",
    "operation_response",
    "operation_result",
    "person_artifacts",
    "stage_name",
    "state_name",
    "status_code",
    "talking_video_persons",
]

T = TypeVar("T")
DEFAULT_ADDRESS = "localhost:50051"
# The metadata key naming a tracking session: the load balancer hashes it (session affinity).
SESSION_KEY_METADATA = "x-framewise-session"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class FramewiseClient(JobsClient):
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.aio.Channel | None = None,
        connection: Connection | None = None,
    ) -> None:
        """``connection``: the API key and TLS settings (clients/channel.py; default: plaintext,
        no key, what a local ``make serve`` takes; ``Connection.from_env()`` reads
        FRAMEWISE_API_KEY, FRAMEWISE_TLS, FRAMEWISE_CA_CERT, ...). ``channel``: a ready channel
        instead (``connection`` is then ignored)."""
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel or open_channel(
            address,
            connection or Connection(),
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
            ],
        )
        self.vision = vision_service_pb2_grpc.VisionServiceStub(self._channel)
        self.tracking = tracking_service_pb2_grpc.TrackingServiceStub(self._channel)
        self.jobs = jobs_service_pb2_grpc.JobServiceStub(self._channel)
        self.operations = operations_pb2_grpc.OperationsStub(self._channel)
        self.info = info_service_pb2_grpc.InfoServiceStub(self._channel)
        self.health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def detect(
        self,
        image: bytes | common_pb2.RawFrame,
        *,
        confidence: float | None = None,
        iou: float | None = None,
        class_names: Iterable[str] = (),
        class_ids: Iterable[int] = (),
        all_classes: bool = False,
        max_detections: int = 0,
        timeout_s: float | None = None,
    ) -> vision_service_pb2.DetectResponse:
        """Detect objects in encoded image bytes (JPEG/PNG/WebP) or a raw frame."""
        request = vision_service_pb2.DetectRequest(
            image=_image(image),
            class_names=list(class_names),
            class_ids=list(class_ids),
            all_classes=all_classes,
            max_detections=max_detections,
        )
        if confidence is not None:
            request.confidence_threshold = confidence
        if iou is not None:
            request.iou_threshold = iou
        return await self.vision.Detect(request, timeout=timeout_s or self.timeout_s)

    async def remove_background(
        self,
        image: bytes | common_pb2.RawFrame,
        *,
        background: BackgroundLike | None = None,
        fit: str = "cover",
        bar_color: str = "",
        alpha_only: bool = False,
        feather_px: float = 0.0,
        crop: BoxLike | None = None,
        crop_person: bool = False,
        person_index: int | None = None,
        timeout_s: float | None = None,
    ) -> vision_service_pb2.RemoveBackgroundResponse:
        """Remove the background of an image; the answer's `png` is the result.

        background: None or "transparent" for the RGBA cut-out, "keep" for the original pixels,
        a colour string ("#RRGGBB", "#RGB", "white", ...) for a solid fill, the bytes of a
        picture (JPEG/PNG/WebP) fitted by `fit` ("cover" or "contain", bars of `bar_color`),
        or a ready Background message. alpha_only: the matte alone (grayscale PNG), no
        background allowed. crop_person: detect persons first and cut out the largest one (or
        `person_index`, highest score first), with a margin.
        """
        request = vision_service_pb2.RemoveBackgroundRequest(
            image=_image(image),
            feather_px=feather_px,
            crop_person=crop_person,
            format=vision_service_pb2.MATTE_FORMAT_ALPHA_PNG if alpha_only else vision_service_pb2.MATTE_FORMAT_RGBA_PNG,
        )
        resolved = background_message(background, fit=fit, bar_color=bar_color)
        if resolved is not None:
            request.background.CopyFrom(resolved)
        if crop is not None:
            request.crop.CopyFrom(_box(crop))
        if person_index is not None:
            request.person_index = person_index
        return await self.vision.RemoveBackground(request, timeout=timeout_s or self.timeout_s)

    async def track(
        self,
        frames: AsyncIterable[tracking_service_pb2.TrackFrame] | Iterable[tracking_service_pb2.TrackFrame],
        *,
        open_session: tracking_service_pb2.OpenSession | None = None,
        session_key: str | None = None,
        frames_in_flight: int = 1,
        timeout_s: float | None = None,
        reconnect_timeout_s: float = 60.0,
        on_reconnect: ReconnectCallback | None = None,
    ) -> AsyncIterator[tracking_service_pb2.TrackResponse]:
        """Run a Track session: yields SessionOpened first, then one FrameResult per frame.

        Frames are written explicitly, at most `frames_in_flight` ahead of the answers. The server
        reads one frame at a time anyway; with the default of 1 no write is ever in progress when
        the server rejects a frame, so its error arrives with its own status. (With a write of a
        large frame still in progress, grpc.aio reports "Internal error from Core" instead, as it
        does for request iterators; the cost of lockstep is one loopback round trip per frame.)

        The session is named by `session_key` (default: a new uuid4; or open_session's
        resume_session_id), sent as the metadata `x-framewise-session` (what a load balancer
        hashes, so the session stays on one replica) and as OpenSession.session_key. When the
        stream ends with UNAVAILABLE (the replica drains and handed the session off, or the
        connection broke) or is reset by a proxy (CANCELLED that this client did not ask for:
        HAProxy may reset the client's stream when the replica ends it early), this reconnects
        with the same key, resumes the session and sends again the frames not answered yet, from
        SessionOpened.next_frame_index: the caller still sees one SessionOpened and every
        frame's result once, in order. `on_reconnect(attempt, error)` is told before each retry;
        it gives up after `reconnect_timeout_s` without a successful resume (0: never
        reconnects) and raises the last error. TrackingInterrupted: the resumed session is past
        a frame whose result never arrived.
        """
        opening = tracking_service_pb2.OpenSession()
        if open_session is not None:
            opening.CopyFrom(open_session)
        key = session_key or opening.resume_session_id or opening.session_key or uuid.uuid4().hex
        if not opening.resume_session_id:
            opening.session_key = key
        metadata = ((SESSION_KEY_METADATA, key),)
        source = _aiter(frames)
        # Frames written (or to write again after a reconnect) whose result has not come, with
        # the index the server gives them; the first is the oldest.
        unanswered: collections.deque[tuple[int, tracking_service_pb2.TrackFrame]] = collections.deque()
        next_index: int | None = None  # index of the next frame taken from `frames`
        exhausted = False
        opened_once = False
        attempt, give_up_at = 0, 0.0
        while True:
            call = self.tracking.Track(timeout=timeout_s, metadata=metadata)
            try:
                await call.write(tracking_service_pb2.TrackRequest(open=opening))
                opened = (await _read(call)).session
                if not opened_once:
                    opened_once = True
                    next_index = opened.next_frame_index
                    yield tracking_service_pb2.TrackResponse(session=opened)
                else:
                    _resume_at(unanswered, opened.next_frame_index, next_index, key)
                attempt = 0
                resend = collections.deque(unanswered)
                in_flight = 0
                while True:
                    while in_flight < frames_in_flight:
                        if resend:
                            frame = resend.popleft()[1]
                        elif not exhausted:
                            try:
                                frame = await anext(source)
                            except StopAsyncIteration:
                                exhausted = True
                                break
                            assert next_index is not None
                            index = frame.frame_index or next_index
                            next_index = index + 1
                            unanswered.append((index, frame))
                        else:
                            break
                        in_flight += 1
                        try:
                            await call.write(tracking_service_pb2.TrackRequest(frame=frame))
                        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                            break  # the server ended the stream: its status comes with the next read
                    if in_flight == 0:
                        await call.done_writing()
                        await _finish(call)
                        return
                    response = await _read(call)
                    unanswered.popleft()
                    in_flight -= 1
                    yield response
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RECONNECT_CODES or reconnect_timeout_s <= 0:
                    raise
                attempt += 1
                now = asyncio.get_running_loop().time()
                if attempt == 1:
                    give_up_at = now + reconnect_timeout_s
                elif now >= give_up_at:
                    raise
                if on_reconnect is not None:
                    on_reconnect(attempt, error)
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 1.0))
                if opened_once:
                    # Resume under the same key; the frames not answered go again.
                    opening = tracking_service_pb2.OpenSession(resume_session_id=key, keep_on_close=opening.keep_on_close)
            finally:
                call.cancel()

    async def server_info(self, *, timeout_s: float | None = None) -> info_service_pb2.GetServerInfoResponse:
        return await self.info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=timeout_s or self.timeout_s)

    async def health_status(self, service: str = "", *, timeout_s: float = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ...; raises grpc.aio.AioRpcError when unreachable."""
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def _read(call: grpc.aio.StreamStreamCall) -> tracking_service_pb2.TrackResponse:
    response = await call.read()
    if response is grpc.aio.EOF:
        code, details = await call.code(), await call.details()
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(), details)
    return response


class TrackingInterrupted(RuntimeError):
    """A resumed tracking session does not continue where this client stopped: results the server
    sent were lost on the way (the session itself went on without them)."""


# Track statuses after which the session is resumed: a draining replica's UNAVAILABLE (or a
# broken connection), and CANCELLED, which grpc.aio reports for a stream the peer reset (a
# client's own cancellation surfaces as asyncio.CancelledError instead). A resume is safe
# whatever happened: the session is where it was, in the shared store, or NOT_FOUND.
_RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})

# on_reconnect(attempt, error): told before each reconnection of a Track session.
ReconnectCallback = Callable[[int, grpc.aio.AioRpcError], None]


def _resume_at(
    unanswered: collections.deque[tuple[int, tracking_service_pb2.TrackFrame]], server_next: int, next_index: int | None, key: str
) -> None:
    """Drop the frames the resumed session already tracked (their results came before the cut)."""
    while unanswered and unanswered[0][0] < server_next:
        unanswered.popleft()
    expected = unanswered[0][0] if unanswered else next_index
    if expected != server_next:
        raise TrackingInterrupted(
            f"tracking session {key!r} resumed at frame {server_next} but this client's next unanswered frame is {expected}"
        )


async def _finish(call: grpc.aio.StreamStreamCall) -> None:
    """After the last result: wait for the server to end the stream; raise its error if any."""
    response = await call.read()
    if response is not grpc.aio.EOF:
        raise TrackingInterrupted("the server sent a Track response after the last frame's result")
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(), await call.details())


async def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


def _image(image: bytes | common_pb2.RawFrame) -> common_pb2.Image:
    if isinstance(image, common_pb2.RawFrame):
        return common_pb2.Image(raw=image)
    return common_pb2.Image(encoded=bytes(image))
