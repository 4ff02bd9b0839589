"""Wires the job worker process (server/jobs/worker/), as server/app.py wires the serving
process, with the same helpers (server/app_jobs.py).

    python -m server.app_worker FD      # started by the serving process, never by hand

It builds its own half of the service from the serving process's settings: a Triton client
and model monitor, the detection / matting / tracking pipelines the jobs call, the storage
tiers (no cleanup loop: the serving process runs it), the D-ID client and a JobExecutor. Its
store and event sink are the serving process's (server/jobs/worker/channel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys

from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from server.app_jobs import WORKER_MODULE, job_admission, job_pipelines, storage_config
from server.cache.result_cache import result_cache_for
from server.health import TritonMonitor
from server.jobs.engine.executor import JobExecutor, RetryPolicy
from server.jobs.files.storage import StorageManager
from server.jobs.files.uploads import UploadStore
from server.jobs.worker.channel import FrontChannel, RemoteEventSink
from server.jobs.worker.child import JobWorker
from server.jobs.worker.ipc import WorkerSettings, read_message
from server.logging_setup import configure_logging
from server.metrics import Metrics
from server.pipelines.detection import DetectionPipeline
from server.pipelines.matting import MattingPipeline
from server.pipelines.tracking import TrackingEngine
from server.services import CACHED_MODELS, JOB_DEGRADABLE_MODELS, SERVICE_MODELS, SERVICES
from server.triton.client import TritonClient
from server.triton.runner import InferenceRunner

__all__ = ["WorkerParts", "main", "serve"]

log = logging.getLogger("server.jobs.worker")

JOBS_SERVICE = SERVICES["jobs"].full_name


class WorkerParts:
    """What the worker process holds, built from the serving process's settings."""

    def __init__(self, settings: WorkerSettings, channel: FrontChannel) -> None:
        config = settings.config
        self.metrics = Metrics(CollectorRegistry())
        self.client = TritonClient(settings.triton_url, metrics=self.metrics, default_timeout_s=config.triton_timeout_s)
        # Its own view of the models the jobs need (a job's model call fails fast with
        # UNAVAILABLE without them); the serving process's monitor drives health.
        self.monitor = TritonMonitor(
            self.client,
            {JOBS_SERVICE: SERVICE_MODELS[JOBS_SERVICE]},
            health_aio.HealthServicer(),
            self.metrics,
            interval_s=config.health_interval_s,
            degradable_models=JOB_DEGRADABLE_MODELS,
            reread_models=CACHED_MODELS,
        )
        self.inference = InferenceRunner(self.client, self.metrics, shm_slots_per_model=settings.triton_shm_slots)
        # The serving process's cache file (it cleared it before starting this process): what a
        # job computes, an RPC finds, and the other way round.
        self.result_cache = result_cache_for(config, self.metrics)
        detection = DetectionPipeline(
            self.inference, self.monitor, self.metrics, max_pixels=config.max_image_pixels, cache=self.result_cache
        )
        matting = MattingPipeline(
            self.inference,
            self.monitor,
            max_pixels=config.max_image_pixels,
            metrics=self.metrics,
            cache=self.result_cache,
        )
        tracking = TrackingEngine(
            self.inference, self.monitor, max_pixels=config.max_image_pixels, max_objects=config.max_objects_per_session
        )
        storage = StorageManager(storage_config(config.jobs), self.metrics)
        uploads = UploadStore(storage, max_bytes=config.jobs.max_upload_bytes)
        pipelines, self.did_http = job_pipelines(config.jobs, detection, matting, tracking, uploads, announce=False)
        self.executor = JobExecutor(
            RemoteEventSink(channel),
            storage,
            job_admission(config.jobs),
            pipelines,
            retry=RetryPolicy(base_s=config.jobs.retry_base_s),
        )

    async def open(self) -> None:
        if self.result_cache is not None:
            await self.result_cache.open()
        await self.monitor.refresh()
        await self.monitor.start()

    async def close(self) -> None:
        """After the JobWorker has stopped the jobs and the executor."""
        await self.monitor.stop()
        await self.inference.close()
        await self.client.close()
        if self.result_cache is not None:
            await self.result_cache.close()
        if self.did_http is not None:
            await self.did_http.aclose()


async def serve(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    message = await read_message(reader)
    if message is None or message[0] != "settings":
        raise SystemExit("the job worker expects its settings first")
    settings: WorkerSettings = message[1]
    configure_logging(settings.config.log_level, settings.config.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_tag_worker)
    channel = FrontChannel(writer)
    parts = WorkerParts(settings, channel)
    await parts.open()
    worker = JobWorker(
        parts.executor,
        channel,
        reader,
        writer,
        registry=parts.metrics.registry,
        metrics_interval_s=settings.metrics_interval_s,
        ready_log={"triton_url": settings.triton_url, "shm_slots": settings.triton_shm_slots},
    )
    await worker.serve()
    await parts.close()
    with contextlib.suppress(ConnectionError):
        writer.close()
    log.info("job worker stopped")


def _tag_worker(record: logging.LogRecord) -> bool:
    """Every line this process logs says it comes from the job worker (same stderr as the
    serving process's)."""
    record.component = "job_worker"
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print(f"usage: python -m {WORKER_MODULE} FD (started by the serving process)", file=sys.stderr)
        return 2
    asyncio.run(serve(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
