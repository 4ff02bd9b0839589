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
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import Self, TypeVar

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.backgrounds import BackgroundLike, background_message
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
    "DownloadResult",
    "FramewiseClient",
    "IntegrityError",
    "JobResponse",
    "JobsClient",
    "OperationFailed",
    "PointLike",
    "RetryCallback",
    "Source",
    "StreamBroken",
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
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class FramewiseClient(JobsClient):
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel or grpc.aio.insecure_channel(
            address,
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
        frames_in_flight: int = 1,
        timeout_s: float | None = None,
    ) -> AsyncIterator[tracking_service_pb2.TrackResponse]:
        """Run a Track stream: yields SessionOpened first, then one FrameResult per frame.

        Frames are written explicitly, at most `frames_in_flight` ahead of the answers. The server
        reads one frame at a time anyway; with the default of 1 no write is ever in progress when
        the server rejects a frame, so its error arrives with its own status. (With a write of a
        large frame still in progress, grpc.aio reports "Internal error from Core" instead, as it
        does for request iterators; the cost of lockstep is one loopback round trip per frame.)
        """
        call = self.tracking.Track(timeout=timeout_s)
        await call.write(tracking_service_pb2.TrackRequest(open=open_session or tracking_service_pb2.OpenSession()))
        yield await _read(call)
        in_flight = 0
        try:
            async for frame in _aiter(frames):
                while in_flight >= frames_in_flight:
                    yield await _read(call)
                    in_flight -= 1
                try:
                    await call.write(tracking_service_pb2.TrackRequest(frame=frame))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    break  # the server ended the stream: its status comes with the next read
                in_flight += 1
            else:
                await call.done_writing()
            while in_flight > 0:
                yield await _read(call)
                in_flight -= 1
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
