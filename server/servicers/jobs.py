"""JobService: uploads, the two submit RPCs (AIP-151 operations), the durable watch stream,
artifact download and storage stats.

Tenancy: an upload and an operation belong to the caller's tenant; a submit may name only the
caller's uploads, and its ``server_path`` resolves under the caller's media root; watching and
downloading reach the caller's operations only (another tenant's read as unknown ones); storage
stats count the caller's uploads, job folders and artifacts (the anonymous caller of a server
without authentication sees the whole storage, as before)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.longrunning import operations_pb2
from google.protobuf.message import Message

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from server.auth.principal import DEFAULT_TENANT, Principal
from server.errors import InvalidInput, ServiceError, Unavailable, shown
from server.jobs.engine.events import EventBus, Heartbeat
from server.jobs.engine.queue import JobQueue
from server.jobs.files.storage import StorageManager
from server.jobs.files.uploads import UploadError, UploadOfOtherTenant, UploadStore, resolve_server_path, upload_status
from server.jobs.store import EventRecord, JobState
from server.quotas.enforcer import QuotaEnforcer
from server.servicers import convert
from server.servicers.operations import operation_proto, queue_position, require_name, store_errors
from server.servicers.tenancy import caller, cross_tenant, media_root, upload_fields

__all__ = ["JobServicer"]

DOWNLOAD_CHUNK_BYTES = 1 << 20
_EVENT_TYPES = {
    "stage_update": jobs_pb2.StageUpdate,
    "progress_update": jobs_pb2.ProgressUpdate,
    "error": jobs_pb2.JobError,
    "complete": jobs_pb2.JobComplete,
}


class EncodedEvents:
    """Serialized WatchOperationResponse bytes per stored event, shared by every watcher: an
    event fanned out to 100 watchers is parsed and serialized once (the interceptor passes
    bytes through), which is most of the per-watcher cost of a stream message in Python."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._bytes: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()

    def get(self, record: EventRecord) -> bytes:
        key = (record.operation, record.sequence)
        encoded = self._bytes.get(key)
        if encoded is None:
            encoded = watch_response(record).SerializeToString()
            self._bytes[key] = encoded
            if len(self._bytes) > self.capacity:
                self._bytes.popitem(last=False)
        return encoded


def watch_response(item: EventRecord | Heartbeat) -> jobs_pb2.WatchOperationResponse:
    response = jobs_pb2.WatchOperationResponse(sequence=item.sequence, name=item.operation, time=convert.timestamp(item.time))
    if isinstance(item, Heartbeat):
        response.heartbeat.SetInParent()
    else:
        getattr(response, item.event_type).CopyFrom(_EVENT_TYPES[item.event_type].FromString(item.payload))
    return response


class JobServicer(jobs_service_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        queue: JobQueue,
        bus: EventBus,
        uploads: UploadStore,
        storage: StorageManager,
        *,
        media_root: Path | None = None,
        quotas: QuotaEnforcer | None = None,
    ) -> None:
        """``media_root``: the folder SegmentVideo's server_path reads from (--media-root), the
        one the job pipelines resolve against; each authenticated tenant gets its sub-folder."""
        self.queue = queue
        self.bus = bus
        self.store = bus.store
        self.uploads = uploads
        self.storage = storage
        self.media_root = media_root
        # Per-tenant quotas (jobs queued or running, storage bytes); None: not limited.
        self.quotas = quotas
        self.encoded_events = EncodedEvents()

    async def UploadFile(
        self, request_iterator: AsyncIterator[jobs_pb2.UploadFileRequest], context: grpc.aio.ServicerContext
    ) -> jobs_pb2.UploadFileResponse:
        self._check_disk()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "header":
            raise InvalidInput("the first UploadFileRequest must carry the header (kind, size_bytes, sha256)", "header")
        header = first.header
        if self.quotas is not None and caller().has_quotas:
            # Before a byte is written: an upload that would take the tenant past its storage
            # quota is refused on its declared size.
            await self.quotas.check_storage(caller().tenant, max(0, header.size_bytes))

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.WhichOneof("message") != "chunk":
                    raise InvalidInput("only the first message may carry a header; the rest carry chunks", "header")
                yield message.chunk

        try:
            info = await self.uploads.receive(
                header.kind, header.filename, header.size_bytes, header.sha256, chunks(), tenant=caller().tenant
            )
        except UploadError as exc:
            raise upload_status(exc) from None
        return jobs_pb2.UploadFileResponse(
            upload_id=info.upload_id, size_bytes=info.size_bytes, sha256=info.sha256, expire_time=convert.timestamp(info.expire_time)
        )

    async def SegmentVideo(self, request: jobs_pb2.SegmentVideoRequest, context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        return await self._submit(jobs_pb2.JOB_KIND_SEGMENT_VIDEO, request, request.request_id)

    async def CreateTalkingVideo(
        self, request: jobs_pb2.CreateTalkingVideoRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        return await self._submit(jobs_pb2.JOB_KIND_TALKING_VIDEO, request, request.request_id)

    async def _submit(self, kind: int, request: Message, request_id: str) -> operations_pb2.Operation:
        if len(request_id) > 128:
            raise InvalidInput("request_id is longer than 128 characters", "request_id")
        self._check_disk()
        principal = caller()
        tenant = principal.tenant
        await self._check_uploads(request, tenant)
        request = await self._tenant_server_path(request, principal)
        try:
            with store_errors():
                async with self._job_quota(kind, request_id, tenant):
                    op = await self.queue.submit(kind, request, request_id, tenant=tenant)
        except UploadError as exc:
            raise upload_status(exc) from None
        return operation_proto(op, await queue_position(self.queue, op))

    @contextlib.asynccontextmanager
    async def _job_quota(self, kind: int, request_id: str, tenant: str) -> AsyncIterator[None]:
        """The tenant's jobs and storage quotas around a submit, checked before the queue's
        global bound so that one tenant's burst is refused while the queue has room for others.
        A repeat of a submission that exists (same request_id) is answered with it, quota or not:
        the client is retrying a call whose answer it lost."""
        if (
            self.quotas is None
            or not caller().has_quotas
            or (request_id and await self.store.find_request(request_id, kind, tenant=tenant))
        ):
            yield
            return
        async with self.quotas.job_admission(tenant):
            yield

    async def _check_uploads(self, request: Message, tenant: str) -> None:
        """Every upload the request names must be the caller's: another tenant's upload is
        NOT_FOUND exactly as one that does not exist (the job later reads it by id only)."""
        for field, upload_id in upload_fields(request):
            try:
                await self.uploads.get(upload_id, tenant=tenant)
            except UploadOfOtherTenant as exc:
                cross_tenant(f"uploads/{upload_id}")
                raise upload_status(exc, field) from None
            except UploadError as exc:
                raise upload_status(exc, field) from None

    async def _tenant_server_path(self, request: Message, principal: Principal) -> Message:
        """An authenticated caller's ``server_path`` is relative to ``<media root>/<tenant>/``:
        checked there (a path or symlink leaving that folder is refused like one leaving the
        media root), then handed to the job prefixed with the tenant's folder, so the pipeline,
        which resolves against the media root, reads the same file. The anonymous caller's
        path is left as it is."""
        server_path = getattr(request, "server_path", "")
        root = media_root(self.media_root, principal) if server_path else None
        if not server_path or root is None or root == self.media_root:
            return request
        try:
            await asyncio.to_thread(resolve_server_path, root, server_path)
        except UploadError as exc:
            raise upload_status(exc, "server_path") from None
        scoped = type(request)()
        scoped.CopyFrom(request)
        scoped.server_path = f"{root.name}/{server_path}"  # type: ignore[attr-defined]
        return scoped

    def _check_disk(self) -> None:
        """Low disk turns JobService NOT_SERVING; new work is refused too, not accepted only to
        fail on a full disk. Watching, downloading and cancelling go on."""
        if self.storage.low_disk:
            raise Unavailable(
                "the server is low on disk space (free space under its low-disk threshold): it takes no new jobs or "
                "uploads until an operator frees space; retry later or on another replica",
                retry_after_s=60.0,
            )

    async def WatchOperation(
        self, request: jobs_pb2.WatchOperationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.WatchOperationResponse | bytes]:
        if request.after_sequence < 0:
            raise InvalidInput("after_sequence must be >= 0", "after_sequence")
        with store_errors():
            op = await self.store.get_operation(require_name(request.name), tenant=caller().tenant)
        # Refused for a running operation too: no client can have seen a sequence past
        # last_sequence (an event is committed before it is published), and the subscription
        # would skip every later event, the terminal one included, and heartbeat forever.
        if request.after_sequence > op.last_sequence:
            raise InvalidInput(
                f"after_sequence {request.after_sequence} is past the operation's last event ({op.last_sequence})",
                "after_sequence",
            )
        # store_errors: a DeleteOperation landing while the history is replayed makes the
        # subscription raise OperationNotFoundError, which must reach the client as NOT_FOUND,
        # not INTERNAL with an incident id.
        with store_errors():
            async with self.bus.subscribe(request.name, request.after_sequence) as events:
                async for item in events:
                    yield watch_response(item) if isinstance(item, Heartbeat) else self.encoded_events.get(item)

    async def DownloadArtifact(
        self, request: jobs_pb2.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[jobs_pb2.DownloadArtifactResponse]:
        tenant = caller().tenant
        with store_errors():
            op = await self.store.get_operation(require_name(request.name), tenant=tenant)
        if op.state != JobState.SUCCEEDED:
            raise ServiceError(
                f"operation {op.name} is {op.state.name}; artifacts can be downloaded once it SUCCEEDED",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            )
        artifacts = {a.name: a for a in await self.store.list_artifacts(op.name, tenant=tenant)}
        record = artifacts.get(request.artifact)
        if record is None:
            raise ServiceError(
                f"operation {op.name} has no artifact {shown(request.artifact)}; it has {', '.join(sorted(artifacts)) or 'none'}",
                code=grpc.StatusCode.NOT_FOUND,
            )
        if not 0 <= request.offset <= record.size:
            raise InvalidInput(f"offset must be within 0..{record.size}", "offset")
        try:
            f = await asyncio.to_thread(open, record.path, "rb")
        except FileNotFoundError:
            raise ServiceError(
                f"artifact {record.name!r} is no longer stored (retention expired at {record.expire_time})",
                code=grpc.StatusCode.NOT_FOUND,
            ) from None
        try:
            await asyncio.to_thread(f.seek, request.offset)
            offset = request.offset
            first = True
            while True:
                data = await asyncio.to_thread(f.read, DOWNLOAD_CHUNK_BYTES)
                if not data and not first:
                    return
                message = jobs_pb2.DownloadArtifactResponse(data=data, offset=offset, total_size_bytes=record.size)
                if first:
                    message.media_type = record.media_type
                    message.sha256 = record.sha256
                    first = False
                yield message
                offset += len(data)
                if not data:
                    return
        finally:
            f.close()

    async def GetStorageStats(
        self, request: jobs_pb2.GetStorageStatsRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.GetStorageStatsResponse:
        stats = await self.storage.stats(await self._owned_storage(caller()))
        return jobs_pb2.GetStorageStatsResponse(
            tiers=[
                jobs_pb2.StorageTierStats(tier=tier, files=t.files, bytes=t.bytes, retention_seconds=int(t.retention_seconds))
                for tier, t in stats.tiers.items()
            ],
            disk_free_bytes=stats.disk_free_bytes,
            disk_total_bytes=stats.disk_total_bytes,
            low_disk=stats.low_disk,
            low_disk_threshold_bytes=stats.low_disk_threshold_bytes,
        )

    async def _owned_storage(self, principal: Principal) -> dict[str, list[str]] | None:
        """The caller's share of the storage tiers (its upload folders, its operations' working
        and artifact folders; temp files belong to nobody yet); None (the whole storage) for
        the anonymous caller of a server without authentication."""
        if principal.via == "anonymous":
            return None
        names, _files, _bytes = await self.store.tenant_usage(principal.tenant)
        folders = [name.removeprefix("operations/") for name in names]
        return {"uploads": await self.uploads.owned(principal.tenant), "processed": folders, "videos": folders}
