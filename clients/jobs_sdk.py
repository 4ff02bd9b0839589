"""Long-running jobs for the client SDK (clients/sdk.py): JobService and
google.longrunning.Operations wrapped as the methods of JobsClient, which FramewiseClient
inherits (upload, submit, watch with reconnect, get / list / cancel / delete / wait, download
with resume), and the helpers that read operations and their events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, message

from clients.backgrounds import BackgroundLike, background_message
from framewise.v1 import common_pb2, jobs_service_pb2, jobs_service_pb2_grpc

T = TypeVar("T")
UPLOAD_CHUNK_BYTES = 1024 * 1024
# Photos and audio up to this size (together) travel inside CreateTalkingVideoRequest; larger
# ones go through UploadFile first. The server's default message limit is 32 MiB; deployments
# (and the tests) may run with 4 MiB, so stay under that with room for the rest of the request.
INLINE_LIMIT_BYTES = 4 * 1024 * 1024
_INLINE_OVERHEAD_BYTES = 64 * 1024
# Statuses after which a read-only stream (WatchOperation, DownloadArtifact) is simply re-opened
# where it broke off: the connection dropped, the server restarted or shed the call.
_RESUMABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
# After the terminal event, how long to wait for the server to end the stream before cancelling it.
_DRAIN_S = 2.0

JobResponse = jobs_service_pb2.SegmentVideoResponse | jobs_service_pb2.CreateTalkingVideoResponse
_RESPONSE_TYPES: dict[str, type[message.Message]] = {
    jobs_service_pb2.SegmentVideoResponse.DESCRIPTOR.full_name: jobs_service_pb2.SegmentVideoResponse,
    jobs_service_pb2.CreateTalkingVideoResponse.DESCRIPTOR.full_name: jobs_service_pb2.CreateTalkingVideoResponse,
}
_FILE_KINDS = {
    "video": jobs_service_pb2.FILE_KIND_VIDEO,
    "image": jobs_service_pb2.FILE_KIND_IMAGE,
    "audio": jobs_service_pb2.FILE_KIND_AUDIO,
}

Source = Path | str | bytes
"""A local file (Path or str path) or its bytes."""
BoxLike = common_pb2.BoundingBox | tuple[float, float, float, float]
"""A BoundingBox or its corners (x1, y1, x2, y2) in original pixels."""
PointLike = common_pb2.PointPrompt | tuple[float, float] | tuple[float, float, bool]
"""A PointPrompt, or (x, y) for a positive point, or (x, y, positive)."""
RetryCallback = Callable[[int, BaseException, float], None]
"""Called before each reconnect with (attempt number, the error, seconds until the retry)."""


class OperationFailed(Exception):
    """The operation ended with an error (FAILED, or CANCELLED with status CANCELLED)."""

    def __init__(self, name: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{name}: {code.name}: {message}")
        self.name = name
        self.code = code
        self.message = message


class StreamBroken(Exception):
    """A stream kept breaking off (or ending early) and the bounded reconnects ran out."""


class IntegrityError(Exception):
    """A download whose bytes do not match the artifact's size or sha256 (nothing is kept)."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    size_bytes: int
    sha256: str
    media_type: str
    # How many times the stream was re-opened from an offset after breaking off.
    resumed: int = 0


class JobsClient:
    """The long-running-jobs methods of FramewiseClient, over its ``jobs`` and ``operations``
    stubs, with its ``timeout_s`` as the default deadline of unary calls."""

    jobs: jobs_service_pb2_grpc.JobServiceStub
    operations: operations_pb2_grpc.OperationsStub
    timeout_s: float

    async def upload_file(
        self,
        source: Source,
        kind: int | str,
        *,
        filename: str | None = None,
        chunk_bytes: int = UPLOAD_CHUNK_BYTES,
        on_progress: Callable[[int, int], None] | None = None,
        timeout_s: float | None = None,
    ) -> jobs_service_pb2.UploadFileResponse:
        """Upload a video, image or audio file (a path or bytes) for a later job.

        `kind` is a FileKind or "video" / "image" / "audio". The size and sha256 are computed
        first and sent in the header (the server checks both); then the bytes follow in chunks of
        `chunk_bytes`, read from disk as they are sent. `on_progress(sent, total)` after each chunk.
        The default deadline is the client's timeout plus one second per MiB.
        """
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        file_kind = _file_kind(kind)
        if isinstance(source, bytes | bytearray | memoryview):
            data: bytes | None = bytes(source)
            path = None
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
            name = filename or ""
        else:
            data, path = None, Path(source)
            size, sha256 = await asyncio.to_thread(_hash_file, path)
            name = path.name if filename is None else filename
        header = jobs_service_pb2.UploadHeader(kind=file_kind, filename=name, size_bytes=size, sha256=sha256)

        async def requests() -> AsyncIterator[jobs_service_pb2.UploadFileRequest]:
            yield jobs_service_pb2.UploadFileRequest(header=header)
            sent = 0
            if data is not None:
                for start in range(0, size, chunk_bytes):
                    chunk = data[start : start + chunk_bytes]
                    yield jobs_service_pb2.UploadFileRequest(chunk=chunk)
                    sent += len(chunk)
                    if on_progress is not None:
                        on_progress(sent, size)
                return
            assert path is not None
            with open(path, "rb") as f:  # noqa: ASYNC230 - reads happen in a worker thread
                while chunk := await asyncio.to_thread(f.read, chunk_bytes):
                    yield jobs_service_pb2.UploadFileRequest(chunk=chunk)
                    sent += len(chunk)
                    if on_progress is not None:
                        on_progress(sent, size)

        timeout = timeout_s if timeout_s is not None else self.timeout_s + size / (1024 * 1024)
        return await self.jobs.UploadFile(requests(), timeout=timeout)

    async def segment_video(
        self,
        video: Source | None = None,
        *,
        server_path: str | None = None,
        upload_id: str | None = None,
        box: BoxLike | None = None,
        points: Iterable[PointLike] = (),
        prompt_frame_index: int = 0,
        sample_fps: float = 0.0,
        max_frames: int = 0,
        artifacts: Iterable[int] = (),
        request_id: str = "",
        on_upload_progress: Callable[[int, int], None] | None = None,
        timeout_s: float | None = None,
    ) -> operations_pb2.Operation:
        """Start tracking an object through a whole video; returns the Operation at once.

        Exactly one source: `video` (a local file or its bytes, uploaded first with UploadFile),
        `server_path` (a file under the server's media root) or `upload_id` (an earlier upload).
        `box` is (x1, y1, x2, y2) corners or a BoundingBox; `points` are (x, y[, positive]) or
        PointPrompts; both in the video's pixels, on frame `prompt_frame_index` (after sampling).
        """
        sources = [v is not None for v in (video, server_path, upload_id)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of video, server_path or upload_id")
        request = jobs_service_pb2.SegmentVideoRequest(
            prompt_frame_index=prompt_frame_index,
            points=[_point(p) for p in points],
            sample_fps=sample_fps,
            max_frames=max_frames,
            artifacts=list(artifacts),
            request_id=request_id,
        )
        if box is not None:
            request.box.CopyFrom(_box(box))
        if video is not None:
            uploaded = await self.upload_file(video, jobs_service_pb2.FILE_KIND_VIDEO, on_progress=on_upload_progress)
            request.upload_id = uploaded.upload_id
        elif server_path is not None:
            request.server_path = server_path
        else:
            request.upload_id = upload_id or ""
        return await self.jobs.SegmentVideo(request, timeout=timeout_s or self.timeout_s)

    async def create_talking_video(
        self,
        image: Source,
        audio: Source,
        *,
        person_index: int | None = None,
        person_point: tuple[float, float] | None = None,
        all_persons: bool = False,
        max_persons: int | None = None,
        background: BackgroundLike | None = None,
        fit: str = "cover",
        bar_color: str = "",
        skip_matting: bool = False,
        require_matting: bool = False,
        request_id: str = "",
        inline_limit_bytes: int = INLINE_LIMIT_BYTES,
        timeout_s: float | None = None,
    ) -> operations_pb2.Operation:
        """Start a photo + audio -> talking-head video job; returns the Operation at once.

        `image` and `audio` are local files or bytes. They (and a background picture) travel
        inside the request while they fit in `inline_limit_bytes` together; otherwise the largest
        (then the next, while still needed) is sent with UploadFile first. The person is the
        largest one unless `person_index` (n-th detection, highest score first) or `person_point`
        (the smallest box containing the point) says otherwise; `all_persons` makes one video per
        detected person instead, highest score first, at most `max_persons` (None: the server's
        limit). `background` is what the photo sent to D-ID shows around the person, as for
        remove_background: None or "transparent" (the cut-out), "keep" (the original pixels, no
        matting), a colour ("#RRGGBB", "#RGB", "white", ...), a picture's bytes fitted by `fit`
        ("cover" or "contain", bars of `bar_color`), or a Background. If background removal fails
        the job goes on with the plain crop (the result says why) unless `require_matting`.
        The per-person results: talking_video_persons(operation) once it is done.
        """
        if person_index is not None and person_point is not None:
            raise ValueError("give person_index or person_point, not both")
        if all_persons and (person_index is not None or person_point is not None):
            raise ValueError("all_persons makes a video for every person: give no person_index or person_point")
        if max_persons is not None and not all_persons:
            raise ValueError("max_persons applies with all_persons")
        resolved = background_message(background, fit=fit, bar_color=bar_color)
        sources = {"image": image, "audio": audio}
        files = {field: await _load(source) for field, source in sources.items()}
        sizes = {field: len(data) for field, data in files.items()}
        # A background picture counts against the inline budget as the photo does (it is an
        # image under the same limits) and is uploaded the same way when it does not fit.
        if resolved is not None and resolved.WhichOneof("image_source") == "image" and resolved.image.WhichOneof("source") == "encoded":
            sizes["background"] = len(resolved.image.encoded)
        budget = max(inline_limit_bytes - _INLINE_OVERHEAD_BYTES, 0)
        upload: set[str] = set()
        for field in sorted(sizes, key=sizes.__getitem__, reverse=True):
            if sum(size for f, size in sizes.items() if f not in upload) > budget:
                upload.add(field)
        request = jobs_service_pb2.CreateTalkingVideoRequest(
            skip_matting=skip_matting,
            require_matting=require_matting,
            request_id=request_id,
            all_persons=all_persons,
            max_persons=max_persons or 0,
        )
        for field, data in files.items():
            if field not in upload:
                setattr(request, field, data)
                continue
            source = sources[field]
            filename = "" if isinstance(source, bytes | bytearray | memoryview) else Path(source).name
            uploaded = await self.upload_file(data, field, filename=filename)
            setattr(request, f"{field}_upload_id", uploaded.upload_id)
        if resolved is not None:
            request.background.CopyFrom(resolved)  # a copy: the caller's message stays as it was
            if "background" in upload:
                uploaded = await self.upload_file(resolved.image.encoded, "image", filename="background")
                request.background.image_upload_id = uploaded.upload_id  # replaces `image` (a oneof)
        if person_index is not None:
            request.person.index = person_index
        elif person_point is not None:
            request.person.point.CopyFrom(common_pb2.Point(x=person_point[0], y=person_point[1]))
        return await self.jobs.CreateTalkingVideo(request, timeout=timeout_s or self.timeout_s)

    async def watch(
        self,
        name: str,
        after_sequence: int = 0,
        *,
        heartbeats: bool = True,
        max_attempts: int = 6,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        idle_timeout_s: float | None = None,
        on_retry: RetryCallback | None = None,
    ) -> AsyncIterator[jobs_service_pb2.WatchOperationResponse]:
        """Every event of the operation after `after_sequence`, ending after the terminal one
        (a "complete" event, or an "error" with will_retry false).

        When the stream breaks (UNAVAILABLE, ABORTED, a reset stream, an end without the terminal
        event, or nothing at all, not even a heartbeat, for `idle_timeout_s`), it is re-opened
        with after_sequence = the last sequence seen, after an exponential backoff with jitter:
        the caller sees each event exactly once, in order. After `max_attempts` consecutive
        failed attempts the last error is raised; any other status (NOT_FOUND, ...) is raised at
        once. Heartbeats (which repeat the last sequence) are yielded unless `heartbeats` is false.
        """
        if after_sequence < 0:
            raise ValueError("after_sequence must be >= 0")
        last = after_sequence
        failures = 0
        while True:
            call = self.jobs.WatchOperation(jobs_service_pb2.WatchOperationRequest(name=name, after_sequence=last))
            progressed = False
            error: BaseException | None = None
            try:
                stream = _with_idle_timeout(call, idle_timeout_s)
                async for event in stream:
                    if event.WhichOneof("event") == "heartbeat":
                        failures = 0
                        if heartbeats:
                            yield event
                        continue
                    if event.sequence <= last:
                        continue  # already delivered before the stream broke
                    last = event.sequence
                    progressed = True
                    failures = 0
                    if is_terminal(event):
                        # The server ends the stream right after the terminal event: let it, rather
                        # than cancel a call that is finishing (a needless RST_STREAM).
                        await _drain(stream, _DRAIN_S)
                        yield event
                        return
                    yield event
            except grpc.aio.AioRpcError as exc:
                if not _resumable(exc):
                    raise
                error = exc
            except TimeoutError as exc:
                error = exc
            finally:
                _cancel(call)
            if error is None and progressed:
                continue  # ended cleanly before the terminal event: pick up where it stopped
            if error is None:
                # Ended cleanly with nothing new: normal for a finished operation whose events
                # were all seen; a server going away may also end streams this way.
                try:
                    op = await self.get_operation(name)
                except grpc.aio.AioRpcError as exc:
                    if not _resumable(exc):
                        raise
                    error = exc
                else:
                    if op.done and job_metadata(op).last_sequence <= last:
                        return
                    error = StreamBroken(f"the watch stream of {name} ended after sequence {last}, before the last event")
            failures += 1
            await _pause_before_retry(failures, error, max_attempts, backoff_s, max_backoff_s, on_retry)

    async def get_operation(self, name: str, *, timeout_s: float | None = None) -> operations_pb2.Operation:
        return await self.operations.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=timeout_s or self.timeout_s)

    async def list_operations(
        self, filter: str = "", *, page_size: int = 0, timeout_s: float | None = None
    ) -> AsyncIterator[operations_pb2.Operation]:
        """Every operation matching `filter` ("state = RUNNING", "kind = TALKING_VIDEO AND done = true",
        ...), oldest first, fetching page after page."""
        token = ""
        while True:
            page = await self.operations.ListOperations(
                operations_pb2.ListOperationsRequest(name="operations", filter=filter, page_size=page_size, page_token=token),
                timeout=timeout_s or self.timeout_s,
            )
            for op in page.operations:
                yield op
            token = page.next_page_token
            if not token:
                return

    async def cancel_operation(self, name: str, *, timeout_s: float | None = None) -> None:
        """Ask for cancellation (FAILED_PRECONDITION if the operation has already finished)."""
        await self.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=timeout_s or self.timeout_s)

    async def delete_operation(self, name: str, *, timeout_s: float | None = None) -> None:
        """Forget a finished operation and delete its artifacts (FAILED_PRECONDITION while it runs)."""
        await self.operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=timeout_s or self.timeout_s)

    async def wait_operation(self, name: str, *, timeout_s: float | None = None) -> operations_pb2.Operation:
        """The operation once it is done, or as it stands after `timeout_s` (None: wait until done).

        The server holds one WaitOperation call for at most 10 minutes; longer waits take several.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            wait = 600.0 if deadline is None else max(min(deadline - loop.time(), 600.0), 0.0)
            timeout = duration_pb2.Duration()
            timeout.FromNanoseconds(int(wait * 1e9))
            op = await self.operations.WaitOperation(
                operations_pb2.WaitOperationRequest(name=name, timeout=timeout), timeout=wait + self.timeout_s
            )
            if op.done or (deadline is not None and loop.time() >= deadline):
                return op

    async def download_artifact(
        self,
        name: str,
        artifact: str,
        out_path: Path | str,
        *,
        max_attempts: int = 6,
        backoff_s: float = 0.25,
        max_backoff_s: float = 5.0,
        on_progress: Callable[[int, int], None] | None = None,
        on_retry: RetryCallback | None = None,
        timeout_s: float | None = None,
    ) -> DownloadResult:
        """Download one artifact of a SUCCEEDED operation to `out_path`.

        The bytes go to a temporary file beside `out_path`, which replaces `out_path` only once
        its size and sha256 match what the server declared (IntegrityError otherwise, and nothing
        is left behind). A stream that breaks off is re-opened from the byte offset reached.
        `timeout_s` bounds each stream that makes no progress (None: no deadline).
        """
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        written, total = 0, -1
        expected_sha, media_type = "", ""
        failures = resumed = 0
        try:
            with os.fdopen(fd, "wb") as f:
                while True:
                    request = jobs_service_pb2.DownloadArtifactRequest(name=name, artifact=artifact, offset=written)
                    call = self.jobs.DownloadArtifact(request, timeout=timeout_s)
                    first = True
                    error: BaseException | None = None
                    try:
                        async for chunk in call:
                            if first:
                                first = False
                                if expected_sha and chunk.sha256 and chunk.sha256 != expected_sha:
                                    raise IntegrityError(f"{artifact} changed on the server during the download")
                                expected_sha = expected_sha or chunk.sha256
                                media_type = media_type or chunk.media_type
                                total = chunk.total_size_bytes
                            if chunk.offset != written:
                                raise IntegrityError(f"{artifact}: the server sent offset {chunk.offset}, expected {written}")
                            if chunk.data:
                                await asyncio.to_thread(f.write, chunk.data)
                                digest.update(chunk.data)
                                written += len(chunk.data)
                                failures = 0
                                if on_progress is not None:
                                    on_progress(written, total)
                    except grpc.aio.AioRpcError as exc:
                        if not _resumable(exc):
                            raise
                        error = exc
                    finally:
                        _cancel(call)
                    if error is None and total >= 0 and written >= total:
                        break
                    if error is None:
                        error = StreamBroken(f"{artifact}: the stream ended at byte {written} of {total}")
                    failures += 1
                    await _pause_before_retry(failures, error, max_attempts, backoff_s, max_backoff_s, on_retry)
                    resumed += 1
            sha256 = digest.hexdigest()
            if written != total:
                raise IntegrityError(f"{artifact}: received {written} bytes, the server declared {total}")
            if expected_sha and sha256 != expected_sha:
                raise IntegrityError(f"{artifact}: sha256 {sha256} does not match the server's {expected_sha}")
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return DownloadResult(out, written, sha256, media_type, resumed)

    async def storage_stats(self, *, timeout_s: float | None = None) -> jobs_service_pb2.GetStorageStatsResponse:
        return await self.jobs.GetStorageStats(jobs_service_pb2.GetStorageStatsRequest(), timeout=timeout_s or self.timeout_s)


# ---------------------------------------------------------------------- operations and events


def job_metadata(op: operations_pb2.Operation) -> jobs_service_pb2.JobMetadata:
    """The JobMetadata packed in a Framewise operation (empty if it carries none)."""
    metadata = jobs_service_pb2.JobMetadata()
    if op.HasField("metadata") and not op.metadata.Unpack(metadata):
        raise ValueError(f"{op.name}: metadata is {op.metadata.type_url}, not framewise.v1.JobMetadata")
    return metadata


def operation_response(op: operations_pb2.Operation) -> JobResponse | None:
    """SegmentVideoResponse or CreateTalkingVideoResponse of a SUCCEEDED operation, else None."""
    if op.WhichOneof("result") != "response":
        return None
    type_name = op.response.TypeName()
    response_type = _RESPONSE_TYPES.get(type_name)
    if response_type is None:
        raise ValueError(f"{op.name}: unexpected response type {type_name}")
    response = response_type()
    op.response.Unpack(response)
    return response  # type: ignore[return-value]


def operation_result(op: operations_pb2.Operation) -> JobResponse:
    """The response of a finished operation; OperationFailed if it failed or was cancelled,
    ValueError if it is still running."""
    result = op.WhichOneof("result")
    if result == "error":
        raise OperationFailed(op.name, status_code(op.error.code), op.error.message)
    if not op.done or result is None:
        raise ValueError(f"{op.name} has not finished (stage {stage_name(job_metadata(op).stage)})")
    response = operation_response(op)
    assert response is not None
    return response


def talking_video_persons(
    result: operations_pb2.Operation | jobs_service_pb2.CreateTalkingVideoResponse,
) -> list[jobs_service_pb2.TalkingVideoPerson]:
    """What happened for each person of a finished talking video (an Operation or its response),
    in detection rank: the one chosen person, or with all_persons every person tried, failed ones
    included (state FAILED and their `error`; the operation still SUCCEEDS while one video was
    made). OperationFailed if the whole operation failed, ValueError if it is still running or
    is not a talking video."""
    response = result if isinstance(result, jobs_service_pb2.CreateTalkingVideoResponse) else operation_result(result)
    if not isinstance(response, jobs_service_pb2.CreateTalkingVideoResponse):
        raise ValueError(f"not a talking video: {type(response).__name__}")
    return list(response.persons)


def person_artifacts(person: jobs_service_pb2.TalkingVideoPerson) -> list[jobs_service_pb2.Artifact]:
    """One person's artifacts, to pass to download_artifact: the video (unless the person
    failed), then the photo sent to D-ID (unless the job failed before making it)."""
    return [a for a in (person.video, person.photo) if a.name]


def status_code(code: int) -> grpc.StatusCode:
    """grpc.StatusCode for a google.rpc.Status code number."""
    return _STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN)


def stage_name(stage: int) -> str:
    """"DETECTION_COMPLETE" for JOB_STAGE_DETECTION_COMPLETE (the number if unknown)."""
    return _enum_name(jobs_service_pb2.JobStage, stage, "JOB_STAGE_")


def state_name(state: int) -> str:
    """"SUCCEEDED" for JOB_STATE_SUCCEEDED."""
    return _enum_name(jobs_service_pb2.JobState, state, "JOB_STATE_")


def kind_name(kind: int) -> str:
    """"TALKING_VIDEO" for JOB_KIND_TALKING_VIDEO."""
    return _enum_name(jobs_service_pb2.JobKind, kind, "JOB_KIND_")


def error_class_name(error_class: int) -> str:
    """"EXTERNAL" for ERROR_CLASS_EXTERNAL."""
    return _enum_name(jobs_service_pb2.ErrorClass, error_class, "ERROR_CLASS_")


def artifact_kind_name(kind: int) -> str:
    """"OVERLAY_MP4" for ARTIFACT_KIND_OVERLAY_MP4."""
    return _enum_name(jobs_service_pb2.ArtifactKind, kind, "ARTIFACT_KIND_")


def background_mode_name(mode: int) -> str:
    """"COLOR" for BACKGROUND_MODE_COLOR."""
    return _enum_name(common_pb2.BackgroundMode, mode, "BACKGROUND_MODE_")


def background_fit_name(fit: int) -> str:
    """"CONTAIN" for BACKGROUND_FIT_CONTAIN."""
    return _enum_name(common_pb2.BackgroundFit, fit, "BACKGROUND_FIT_")


def is_terminal(event: jobs_service_pb2.WatchOperationResponse) -> bool:
    """Whether the event ends the operation's event stream: "complete", or a final error."""
    kind = event.WhichOneof("event")
    return kind == "complete" or (kind == "error" and not event.error.will_retry)


def _enum_name(enum: object, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix)  # type: ignore[attr-defined]
    except ValueError:
        return str(value)


def _file_kind(kind: int | str) -> int:
    if isinstance(kind, str):
        key = kind.lower().removeprefix("file_kind_")
        if key not in _FILE_KINDS:
            raise ValueError(f"unknown file kind {kind!r}; one of {', '.join(_FILE_KINDS)}")
        return _FILE_KINDS[key]
    return int(kind)


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(UPLOAD_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


async def _load(source: Source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    return await asyncio.to_thread(Path(source).read_bytes)


def _box(box: BoxLike) -> common_pb2.BoundingBox:
    if isinstance(box, common_pb2.BoundingBox):
        return box
    x1, y1, x2, y2 = box
    return common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)


def _point(point: PointLike) -> common_pb2.PointPrompt:
    if isinstance(point, common_pb2.PointPrompt):
        return point
    x, y, *rest = point
    positive = bool(rest[0]) if rest else True
    label = common_pb2.POINT_LABEL_POSITIVE if positive else common_pb2.POINT_LABEL_NEGATIVE
    return common_pb2.PointPrompt(point=common_pb2.Point(x=x, y=y), label=label)


def _resumable(exc: grpc.aio.AioRpcError) -> bool:
    """A status after which re-opening a read-only stream where it stopped is the right answer:
    the connection or the server went away (UNAVAILABLE, ABORTED), or the HTTP/2 stream was reset,
    or ended without a status: HAProxy ends a watch whose replica died (kill -9) with END_STREAM
    and no trailers, which gRPC reports as UNKNOWN "Stream removed"."""
    if exc.code() in _RESUMABLE_CODES:
        return True
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNKNOWN:
        return "Stream removed" in details
    return exc.code() == grpc.StatusCode.INTERNAL and "RST_STREAM" in details


async def _pause_before_retry(
    failures: int,
    error: BaseException,
    max_attempts: int,
    backoff_s: float,
    max_backoff_s: float,
    on_retry: RetryCallback | None,
) -> None:
    """Raises ``error`` once ``failures`` reaches ``max_attempts``; else reports the retry and
    sleeps the backoff before the caller reconnects."""
    if failures >= max_attempts:
        raise error
    delay = _backoff(failures, backoff_s, max_backoff_s)
    if on_retry is not None:
        on_retry(failures, error, delay)
    await asyncio.sleep(delay)


def _backoff(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random."""
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)


def _cancel(call: object) -> None:
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        cancel()


async def _drain(stream: AsyncIterator[object], timeout_s: float) -> None:
    """Read `stream` to its end (its status included), for at most `timeout_s`."""
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
        async with asyncio.timeout(timeout_s):
            async for _ in stream:
                pass


async def _with_idle_timeout(stream: AsyncIterable[T], idle_timeout_s: float | None) -> AsyncIterator[T]:
    """The stream's items; TimeoutError when none arrives for `idle_timeout_s` (None: wait forever)."""
    if idle_timeout_s is None:
        async for item in stream:
            yield item
        return
    iterator = aiter(stream)
    while True:
        try:
            item = await asyncio.wait_for(anext(iterator), idle_timeout_s)
        except StopAsyncIteration:
            return
        yield item
