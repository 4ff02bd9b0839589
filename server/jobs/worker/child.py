"""The job worker process's end of the channel: it runs the jobs the serving process sends it
(server/jobs/worker/ipc.py has the messages, server/jobs/worker/process.py the other end and
the why).

The process itself is wired in server/app_worker.py (``python -m server.app_worker FD``, started
by the serving process, never by hand): a Triton client and model monitor, the detection /
matting / tracking pipelines the jobs call, the storage tiers, the D-ID client and the
JobExecutor that ``JobWorker`` here hands each job to. Its store and event sink are the serving
process's (server/jobs/worker/channel.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, generate_latest

from server.aio import cancel_and_wait
from server.jobs.engine.executor import JobExecutor
from server.jobs.store import JobStoreUnavailableError, LeaseLostError
from server.jobs.worker.channel import FrontChannel
from server.jobs.worker.ipc import read_message, write_message

__all__ = ["JobWorker"]

log = logging.getLogger("server.jobs.worker")


class JobWorker:
    """Runs what the serving process sends on ``executor``, says when each job is done, and
    pushes this process's metrics every ``metrics_interval_s``."""

    def __init__(
        self,
        executor: JobExecutor,
        channel: FrontChannel,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        registry: CollectorRegistry,
        metrics_interval_s: float,
        ready_log: Mapping[str, object],
    ) -> None:
        """``ready_log``: what the "job worker ready" log line says about this process."""
        self.executor = executor
        self.channel = channel
        self._reader = reader
        self._writer = writer
        self._registry = registry
        self._metrics_interval_s = metrics_interval_s
        self._ready_log = dict(ready_log)
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Task[None]] = {}

    async def serve(self) -> None:
        """Until SIGTERM, or until the serving process closes the channel (it is gone); then
        the jobs stop where they are and the executor stops."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        receiver = asyncio.create_task(self._receive(stop), name="receive")
        pusher = asyncio.create_task(self._push_metrics(), name="push-metrics")
        gc.collect()
        gc.freeze()  # as the serving process: full collections walk only what jobs leave behind
        write_message(self._writer, "ready")
        log.info("job worker ready", extra=self._ready_log)
        await stop.wait()
        await cancel_and_wait(receiver)
        await cancel_and_wait(pusher)
        await self._stop_jobs()

    async def _receive(self, stop: asyncio.Event) -> None:
        while (message := await read_message(self._reader)) is not None:
            kind, *fields = message
            if kind == "reply":
                self.channel.resolve(*fields)
                continue
            name = fields[0]
            if kind == "run" and name not in self._jobs:
                epoch = fields[1] if len(fields) > 1 else None
                self._jobs[name] = asyncio.create_task(self._run(name, epoch), name=f"job {name}")
            elif kind == "cancel" and name in self._jobs and name not in self._cancels:
                self._cancels[name] = asyncio.create_task(self._cancel(name), name=f"cancel {name}")
            elif kind == "stop" and name in self._jobs:
                self._jobs[name].cancel()  # lease lost: stops without writing, not reported done
        stop.set()

    async def _run(self, name: str, epoch: int | None) -> None:
        try:
            await self.executor.run(name, epoch)
            if name in self._cancels:  # the cancel may still be writing the CANCELLED event
                await asyncio.wait([self._cancels[name]])
        except (LeaseLostError, JobStoreUnavailableError):
            pass  # logged by the executor; the serving process's JobQueue frees or gives up the lease
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
            write_message(self._writer, "metrics", generate_latest(self._registry))
            await asyncio.sleep(self._metrics_interval_s)

    async def _stop_jobs(self) -> None:
        """Jobs stop where they are: they stay RUNNING in the store and resume when sent again."""
        # The wrappers first: a job stopped this way must not be reported "done".
        tasks = [*self._jobs.values(), *self._cancels.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.executor.stop()
