"""The job worker process: runs the jobs the serving process sends it (server/jobs/ipc.py has
the messages, server/jobs/worker_process.py the other end and the why).

    python -m server.jobs.worker_main FD      # started by the serving process, never by hand

It builds its own half of the service from the serving process's settings: a Triton client
and model monitor, the detection / matting / tracking pipelines the jobs call, the
storage tiers (no cleanup loop: the serving process runs it), the D-ID client and a
JobExecutor. Its store and event sink are the serving process's (server/jobs/worker_channel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys

from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry, generate_latest

from server.aio import cancel_and_wait
from server.app import CACHED_MODELS, JOB_DEGRADABLE_MODELS, SERVICE_MODELS, SERVICES
from server.app_jobs import job_admission, job_pipelines, storage_config
from server.cache.result_cache import result_cache_for
from server.health import TritonMonitor
from server.jobs.executor import JobExecutor, RetryPolicy
from server.jobs.ipc import WorkerSettings, read_message, write_message
from server.jobs.storage import StorageManager
from server.jobs.uploads import UploadStore
from server.jobs.worker_channel import FrontChannel, RemoteEventSink
from server.logging_setup import configure_logging
from server.metrics import Metrics
from server.pipelines.detection import DetectionPipeline
from server.pipelines.matting import MattingPipeline
from server.pipelines.tracking import TrackingEngine
from server.triton.client import TritonClient
from server.triton.runner import InferenceRunner

log = logging.getLogger("server.jobs.worker")

JOBS_SERVICE = SERVICES["jobs"].full_name


class JobWorker:
    """What the worker process holds, built from the serving process's settings."""

    def __init__(self, settings: WorkerSettings, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.settings = settings
        self._reader = reader
        self._writer = writer
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
        self.channel = FrontChannel(writer)
        storage = StorageManager(storage_config(config.jobs), self.metrics)
        uploads = UploadStore(storage, max_bytes=config.jobs.max_upload_bytes)
        pipelines, self.did_http = job_pipelines(config.jobs, detection, matting, tracking, uploads, announce=False)
        self.executor = JobExecutor(
            RemoteEventSink(self.channel),
            storage,
            job_admission(config.jobs),
            pipelines,
            retry=RetryPolicy(base_s=config.jobs.retry_base_s),
        )
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Task[None]] = {}

    async def serve(self) -> None:
        """Until SIGTERM, or until the serving process closes the channel (it is gone)."""
        if self.result_cache is not None:
            await self.result_cache.open()
        await self.monitor.refresh()
        await self.monitor.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        receiver = asyncio.create_task(self._receive(stop), name="receive")
        pusher = asyncio.create_task(self._push_metrics(), name="push-metrics")
        gc.collect()
        gc.freeze()  # as the serving process: full collections walk only what jobs leave behind
        write_message(self._writer, "ready")
        log.info(
            "job worker ready",
            extra={"triton_url": self.settings.triton_url, "shm_slots": self.settings.triton_shm_slots},
        )
        await stop.wait()
        await cancel_and_wait(receiver)
        await cancel_and_wait(pusher)
        await self._close()

    async def _receive(self, stop: asyncio.Event) -> None:
        while (message := await read_message(self._reader)) is not None:
            kind, *fields = message
            if kind == "reply":
                self.channel.resolve(*fields)
                continue
            (name,) = fields
            if kind == "run" and name not in self._jobs:
                self._jobs[name] = asyncio.create_task(self._run(name), name=f"job {name}")
            elif kind == "cancel" and name in self._jobs and name not in self._cancels:
                self._cancels[name] = asyncio.create_task(self._cancel(name), name=f"cancel {name}")
        stop.set()

    async def _run(self, name: str) -> None:
        try:
            await self.executor.run(name)
            if name in self._cancels:  # the cancel may still be writing the CANCELLED event
                await asyncio.wait([self._cancels[name]])
        except Exception:
            log.exception("job execution failed", extra={"operation": name})
        finally:
            self._jobs.pop(name, None)
        # Not reached when the task is cancelled (shutdown): that job is not done, it resumes.
        write_message(self._writer, "done", name)

    async def _cancel(self, name: str) -> None:
        try:
            await self.executor.cancel(name)
        finally:
            self._cancels.pop(name, None)

    async def _push_metrics(self) -> None:
        while True:
            write_message(self._writer, "metrics", generate_latest(self.metrics.registry))
            await asyncio.sleep(self.settings.metrics_interval_s)

    async def _close(self) -> None:
        """Jobs stop where they are: they stay RUNNING in the store and resume when sent again."""
        # The wrappers first: a job stopped this way must not be reported "done".
        tasks = [*self._jobs.values(), *self._cancels.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.executor.stop()
        await self.monitor.stop()
        await self.inference.close()
        await self.client.close()
        if self.result_cache is not None:
            await self.result_cache.close()
        if self.did_http is not None:
            await self.did_http.aclose()
        with contextlib.suppress(ConnectionError):
            self._writer.close()
        log.info("job worker stopped")


async def serve(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    message = await read_message(reader)
    if message is None or message[0] != "settings":
        raise SystemExit("the job worker expects its settings first")
    settings: WorkerSettings = message[1]
    configure_logging(settings.config.log_level, settings.config.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_tag_worker)
    await JobWorker(settings, reader, writer).serve()


def _tag_worker(record: logging.LogRecord) -> bool:
    """Every line this process logs says it comes from the job worker (same stderr as the
    serving process's)."""
    record.component = "job_worker"
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m server.jobs.worker_main FD (started by the serving process)", file=sys.stderr)
        return 2
    asyncio.run(serve(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
