"""The long-running jobs part of the orchestrator. Both processes build their job files
(storage tiers, uploads), admission slots and the job kinds' definitions with ``job_files``,
``job_admission`` and ``job_definitions``; the serving process adds the durable store, the event
bus, the queue (and the job worker process it hands jobs to) and the retention loop
(``start_jobs``). The JobService / Operations servicers are registered with the others in
server/wiring/grpc_server.py."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.config import JobsConfig
from server.did.client import DIDClient, OnRetry
from server.jobs.engine.admission import Admission
from server.jobs.engine.events import EventBus
from server.jobs.engine.executor import RetryPolicy
from server.jobs.engine.definition import JobDefinition
from server.jobs.engine.queue import JobQueue
from server.jobs.engine.retention import OperationRetention
from server.jobs.files.storage import StorageConfig, StorageManager
from server.jobs.files.uploads import UploadStore
from server.jobs.kinds.segment_video import SegmentVideoJob
from server.jobs.kinds.talking_video import DIDFactory, TalkingVideoJob
from server.jobs.store import JobStore
from server.jobs.store.factory import open_job_store
from server.jobs.worker.ipc import WorkerSettings
from server.jobs.worker.process import WorkerProcess
from server.metrics import Metrics
from server.pipelines.detection import DetectionPipeline
from server.pipelines.matting import MattingPipeline
from server.sam2.video_predictor import VideoPredictor

__all__ = ["WORKER_MODULE", "Jobs", "job_admission", "job_files", "job_definitions", "start_jobs", "storage_config"]

log = logging.getLogger("server.jobs")

# What the serving process runs with ``python -m`` to start the job worker process.
WORKER_MODULE = "server.app_worker"
# The one-per-cluster duty (JobStore.try_cluster_duty) of sweeping the shared storage root.
STORAGE_CLEANUP_DUTY = "storage-cleanup"


@dataclass
class Jobs:
    store: JobStore
    bus: EventBus
    storage: StorageManager
    uploads: UploadStore
    queue: JobQueue
    did_http: httpx.AsyncClient | None
    retention: OperationRetention
    worker: WorkerProcess | None = None

    def not_serving_reason(self) -> str:
        """Why the job service cannot take work now ("" when it can), for its health status."""
        store_down = getattr(self.store, "unavailable_reason", None)
        if store_down:
            # Calls fail fast with UNAVAILABLE meanwhile; the store reconnects by itself and the
            # lanes resume, so this clears without a restart.
            return f"the job store is unavailable: {store_down}"
        if self.storage.low_disk:
            return "free disk space is under the low-disk threshold"
        return self.worker.down_reason if self.worker is not None else ""

    async def start(self) -> None:
        """Cleanup loop, then the queue (which resumes what a previous process left)."""
        await self.storage.start()
        await self.retention.start()
        await self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self.retention.stop()
        self.bus.close()
        await self.storage.stop()
        await self.store.close()
        if self.did_http is not None:
            await self.did_http.aclose()


async def start_jobs(
    config: JobsConfig,
    *,
    detection: DetectionPipeline,
    matting: MattingPipeline,
    video_predictor: VideoPredictor,
    metrics: Metrics,
    worker: WorkerSettings | None = None,
    replica_id: str = "",
) -> Jobs:
    """Opens the store and builds everything; call ``Jobs.start`` once Triton is up. With
    ``worker`` settings (``--job-process worker``) the jobs run in the job worker process; the
    definitions built here then only check submit requests. ``replica_id`` names this replica in
    the leases of the jobs it claims (default: host name and PID)."""
    store = await open_job_store(config.store, sqlite_synchronous=config.store_sync)
    bus = EventBus(store, heartbeat_s=config.heartbeat_s)
    # One storage root shared by the replicas is swept by one of them.
    storage, uploads = job_files(config, metrics, duty=lambda: store.try_cluster_duty(STORAGE_CLEANUP_DUTY))
    definitions, did_http = job_definitions(config, detection, matting, video_predictor, uploads)
    execution = None if worker is None else WorkerProcess(worker, bus, module=WORKER_MODULE)
    queue = JobQueue(
        bus,
        storage,
        job_admission(config),
        definitions,
        concurrency=config.concurrency,
        max_queued=config.max_queued,
        retry=RetryPolicy(base_s=config.retry_base_s),
        execution=execution,
        replica_id=replica_id or None,
        lease_s=config.lease_s,
        renew_s=config.lease_renew_s,
    )
    retention = OperationRetention(
        store, retention_s=config.retention_operations_s, interval_s=config.cleanup_interval_s
    )
    return Jobs(store, bus, storage, uploads, queue, did_http, retention, execution)


def job_files(
    config: JobsConfig, metrics: Metrics, *, duty: Callable[[], Awaitable[bool]] | None = None
) -> tuple[StorageManager, UploadStore]:
    """The storage tiers and the uploads in them. ``duty``: whether this replica sweeps the
    storage root now (the serving process's cleanup loop); the job worker passes none and
    runs no cleanup loop."""
    storage = StorageManager(storage_config(config), metrics, duty=duty)
    return storage, UploadStore(storage, max_bytes=config.max_upload_bytes)


def storage_config(config: JobsConfig) -> StorageConfig:
    return StorageConfig(
        root=config.storage_root,
        uploads_retention_s=config.retention_uploads_s,
        processed_retention_s=config.retention_processed_s,
        videos_retention_s=config.retention_videos_s,
        temp_retention_s=config.retention_temp_s,
        cleanup_interval_s=config.cleanup_interval_s,
        low_disk_bytes=config.low_disk_bytes,
        disk_check_interval_s=config.disk_check_interval_s,
    )


def job_admission(config: JobsConfig) -> Admission:
    return Admission({"detection": config.detection_slots, "matting": config.matting_slots, "tracking": config.tracking_slots})


def job_definitions(
    config: JobsConfig,
    detection: DetectionPipeline,
    matting: MattingPipeline,
    video_predictor: VideoPredictor,
    uploads: UploadStore,
    *,
    announce: bool = True,
) -> tuple[dict[int, JobDefinition], httpx.AsyncClient | None]:
    """The two definitions by JobKind, and the D-ID connection pool they share (to close).
    ``announce``: log where talking videos go (the serving process does; its worker need not)."""
    did_factory, did_http = _did_factory(config, announce)
    definitions: dict[int, JobDefinition] = {
        jobs_pb2.JOB_KIND_SEGMENT_VIDEO: SegmentVideoJob(video_predictor, uploads, media_root=config.media_root),
        jobs_pb2.JOB_KIND_TALKING_VIDEO: TalkingVideoJob(
            detection,
            matting,
            uploads,
            did_factory,
            did_poll_interval_s=config.did_poll_interval_s,
            did_wait_timeout_s=config.did_wait_timeout_s,
            max_persons=config.max_talk_persons,
        ),
    }
    return definitions, did_http


def _did_factory(config: JobsConfig, announce: bool) -> tuple[DIDFactory | None, httpx.AsyncClient | None]:
    if not config.did_api_key:
        if announce:
            log.warning(
                "no D-ID API key configured (FRAMEWISE_DID_API_KEY): CreateTalkingVideo answers FAILED_PRECONDITION"
            )
        return None, None
    if announce and config.did_is_emulator:
        log.warning(
            "TALKING VIDEOS GO TO THE LOCAL D-ID EMULATOR, NOT D-ID: results are the photo held still over the "
            "audio. Set FRAMEWISE_DID_API_KEY to use the real service.",
            extra={"did_url": config.did_url},
        )
    elif announce:
        log.info("D-ID configured", extra={"did_url": config.did_url})
    # One connection pool for every job's D-ID calls.
    http = httpx.AsyncClient(timeout=httpx.Timeout(config.did_timeout_s))
    api_key = config.did_api_key

    def make(on_retry: OnRetry) -> DIDClient:
        return DIDClient(config.did_url, api_key, timeout_s=config.did_timeout_s, on_retry=on_retry, http=http)

    return make, http
