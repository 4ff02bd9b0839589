"""The job worker process (server/jobs/worker/), built from the same composition root as the
serving process (server/app.py): server/wiring/.

    python -m server.app_worker FD      # started by the serving process, never by hand

It builds its own half of the service from the serving process's settings: the inference
stack (its own Triton client, model monitor, runner and the model pipelines the jobs call), the
storage tiers (no cleanup loop: the serving process runs it), the D-ID client and a
JobExecutor. Its store and event sink are the serving process's (server/jobs/worker/channel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys

from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from server.jobs.engine.executor import JobExecutor, RetryPolicy
from server.jobs.worker.channel import FrontChannel, RemoteEventSink
from server.jobs.worker.child import JobWorker
from server.jobs.worker.ipc import WorkerSettings, read_message
from server.logging_setup import configure_logging
from server.metrics import Metrics
from server.services import JOB_DEGRADABLE_MODELS, SERVICE_MODELS, SERVICES
from server.wiring.inference import build_inference_stack
from server.wiring.jobs import WORKER_MODULE, job_admission, job_files, job_definitions

__all__ = ["WorkerParts", "main", "serve"]

log = logging.getLogger("server.jobs.worker")

JOBS_SERVICE = SERVICES["jobs"].full_name


class WorkerParts:
    """What the worker process holds, built from the serving process's settings."""

    def __init__(self, settings: WorkerSettings, channel: FrontChannel) -> None:
        config = settings.config
        self.metrics = Metrics(CollectorRegistry())
        # Its own view of the models the jobs need (a job's model call fails fast with
        # UNAVAILABLE without them); the serving process's monitor drives health. The cache is
        # the serving process's file (it cleared it before starting this process).
        self.inference = build_inference_stack(
            config,
            self.metrics,
            triton_url=settings.triton_url,
            shm_slots=settings.triton_shm_slots,
            service_models={JOBS_SERVICE: SERVICE_MODELS[JOBS_SERVICE]},
            health=health_aio.HealthServicer(),
            degradable_models=JOB_DEGRADABLE_MODELS,
        )
        inference = self.inference
        storage, uploads = job_files(config.jobs, self.metrics)
        definitions, self.did_http = job_definitions(
            config.jobs, inference.detection, inference.matting, inference.video_predictor, uploads, announce=False
        )
        self.executor = JobExecutor(
            RemoteEventSink(channel),
            storage,
            job_admission(config.jobs),
            definitions,
            retry=RetryPolicy(base_s=config.jobs.retry_base_s),
        )

    async def open(self) -> None:
        await self.inference.open_cache(clear=False)
        await self.inference.monitor.refresh()
        await self.inference.monitor.start()

    async def close(self) -> None:
        """After the JobWorker has stopped the jobs and the executor."""
        await self.inference.monitor.stop()
        await self.inference.close()
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
