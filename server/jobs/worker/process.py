"""The serving process's handle on the job worker process: a ``JobExecution`` that runs jobs
there (server/jobs/worker/child.py is the other end; server/app_worker.py wires that process).

Why a process: a job's own work (image decoding, HTTP to D-ID, Triton calls, the store) ran on
the event loop that also serves every WatchOperation and tracking stream. Measured with
bench/jobs_bench.py on 2 cores, that work, and the CPU it takes, is what pushed watch events'
p99 past 20 ms with 100 subscribers. In its own process, at a lower CPU priority (nice), it
cannot hold the serving loop, and the kernel runs the serving process first when both want
a core.

Contract kept across the boundary:

* the worker's jobs call this process for every store write and event ("emit": stored, then
  published here), so watchers still never see an event that is not durable, and delivery
  (commit -> EventBus -> streams) runs entirely in this process, at its priority;
* the serving process's JobQueue claims the jobs and holds (renews) their leases; the worker
  runs what it is sent, every write carrying the lease's epoch, and stops a job without
  writing more when told ("stop": the lease was lost);
* if the worker dies, it is started again and sent every job it had; each resumes after its
  last completed stage, as after a server crash. If the serving process dies (even SIGKILL),
  the kernel kills the worker, so no job runs twice.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server.aio import cancel_and_wait
from server.config import REPO_ROOT
from server.jobs.engine.events import EventBus
from server.jobs.store import JobStoreError
from server.jobs.worker.ipc import WorkerSettings, read_message, write_message
from server.processes import child_setup, terminate

__all__ = ["WorkerProcess"]

log = logging.getLogger("server.jobs")


class WorkerProcess:
    def __init__(
        self,
        settings: WorkerSettings,
        bus: EventBus,
        *,
        module: str,
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        """``module``: what ``python -m`` runs to start the worker process with its channel's fd
        as its one argument (server/app_worker.py)."""
        self.settings = settings
        self.bus = bus
        self.module = module
        self.nice = settings.config.jobs.worker_nice
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restarts = 0
        # The worker's latest Prometheus exposition (merged into /metrics by server.metrics).
        self.metrics_text = b""
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._connected = False  # ready, and its channel open
        # Operations sent to the worker, in the order sent, until it reports them done.
        self._runs: dict[str, asyncio.Future[None]] = {}
        self._epochs: dict[str, int | None] = {}  # the lease each run carries (fencing)
        # What the worker may call: the store writes and reads its jobs make, and emit, which
        # stores and publishes here, on this process's loop, at this process's priority.
        store = bus.store
        self._handlers: dict[str, Callable[..., Awaitable[Any]]] = {
            "emit": bus.emit,
            "get_operation": store.get_operation,
            "get_request": store.get_request,
            "update_operation": store.update_operation,
            "add_artifact": store.add_artifact,
            "list_artifacts": store.list_artifacts,
        }
        self._calls: set[asyncio.Task[None]] = set()
        self.down_reason = "the job worker process has not started"

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    # ------------------------------------------------------------------ JobExecution

    async def start(self) -> None:
        """Starts the worker in the background (it takes seconds to import and build): jobs
        handed over meanwhile are sent once it is ready, and the job service's health says
        NOT_SERVING until then (``down_reason``)."""
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name="job-worker-supervisor")

    async def stop(self) -> None:
        """SIGTERM: the worker stops its jobs (they stay RUNNING, to resume) and exits."""
        self._stopping = True
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        await terminate(self._process, self.stop_timeout_s, "job worker")
        await cancel_and_wait(self._reader_task)
        # Calls the worker made before it exited finish here (the store is still open).
        await asyncio.gather(*self._calls, return_exceptions=True)
        self._close_channel()
        for future in self._runs.values():
            future.cancel()
        self._runs.clear()

    async def run(self, name: str, epoch: int | None = None) -> None:
        future = asyncio.get_running_loop().create_future()
        self._runs[name] = future
        self._epochs[name] = epoch
        try:
            self._send("run", name, epoch)
            await future
        except asyncio.CancelledError:
            # The JobQueue lost the lease (or stops): the worker stops the job where it is,
            # writing nothing more, and does not report it done.
            if not future.done():
                self._send("stop", name)
            raise
        finally:
            self._runs.pop(name, None)
            self._epochs.pop(name, None)

    async def cancel(self, name: str) -> None:
        future = self._runs.get(name)
        if future is None:
            return
        self._send("cancel", name)
        # The job ends CANCELLED (or had already ended); "done" resolves its future. asyncio.wait,
        # not await: a CancelOperation call cancelled by its client must not cancel that future.
        await asyncio.wait([future])

    # ------------------------------------------------------------------ the child

    async def _spawn(self) -> None:
        self._ready.clear()
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                cwd=REPO_ROOT,
                # SIGKILL, not SIGTERM, when the serving process dies: a new serving process
                # resumes the jobs; an old worker still finishing one must not run beside it.
                preexec_fn=child_setup(signal.SIGKILL, nice=self.nice),
            )
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        write_message(self._writer, "settings", self.settings)
        self._reader_task = asyncio.create_task(self._read(reader), name="job-worker-reader")
        started = time.monotonic()
        ready = asyncio.ensure_future(self._ready.wait())
        # The reader ends first if the worker dies while it starts.
        await asyncio.wait(
            [ready, self._reader_task], timeout=self.start_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        ready.cancel()
        if not self._ready.is_set():
            self._process.kill()
            await self._process.wait()
            raise RuntimeError(
                f"the job worker process did not start within {self.start_timeout_s:.0f} s "
                f"(exit code {self._process.returncode}); its log lines are in the server's log"
            )
        self.down_reason = ""
        self._connected = True
        log.info(
            "job worker process ready",
            extra={"pid": self._process.pid, "nice": self.nice, "start_s": round(time.monotonic() - started, 2)},
        )
        # Whatever it was running before a restart, in the order first sent.
        for name in self._runs:
            self._send("run", name, self._epochs.get(name))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            await self._dispatch(reader)
        finally:
            process = self._process
            if not self._stopping and process is not None and process.returncode is None:
                # A channel that broke under a live worker (a bad frame): its calls and "done"
                # reports can no longer arrive. Kill it; the supervisor starts a new one, which
                # resumes its jobs.
                log.error("job worker channel closed; killing the worker", extra={"pid": process.pid})
                process.kill()

    async def _dispatch(self, reader: asyncio.StreamReader) -> None:
        runs = self._runs
        while (message := await read_message(reader)) is not None:
            kind = message[0]
            if kind == "call":
                task = asyncio.create_task(self._answer(*message[1:]))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
            elif kind == "done":
                future = runs.get(message[1])
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind == "metrics":
                self.metrics_text = message[1]
            elif kind == "ready":
                self._ready.set()
            else:
                log.error("unknown message from the job worker", extra={"kind": kind})

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._spawn()
                code = await self._process.wait()  # type: ignore[union-attr]
                reason = f"the job worker process exited (code {code})"
            except Exception as exc:  # noqa: BLE001 - keep supervising whatever went wrong
                reason = f"the job worker process failed to start: {exc}"
            self._connected = False
            await cancel_and_wait(self._reader_task)
            self._close_channel()
            if self._stopping:
                return
            # A worker that keeps dying at once is restarted ever more slowly.
            backoff = min(backoff * 2, 30.0) if time.monotonic() - started < 30.0 else 1.0
            self.restarts += 1
            self.down_reason = f"{reason}; restarting it"
            log.error(
                "job worker process down; restarting it",
                extra={"reason": reason, "backoff_s": backoff, "jobs_to_resume": len(self._runs)},
            )
            await asyncio.sleep(backoff)

    async def _answer(self, call_id: int, method: str, args: tuple, kwargs: dict) -> None:
        handler = self._handlers.get(method)
        try:
            if handler is None:
                raise ValueError(f"the job worker called an unknown method {method!r}")
            value, ok = await handler(*args, **kwargs), True
        except Exception as exc:  # noqa: BLE001 - raised again in the worker
            value, ok = exc, False
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that cannot cross: its text can
                value = JobStoreError(f"{type(exc).__name__}: {exc}")
        self._send("reply", call_id, ok, value)

    def _send(self, *message: object) -> None:
        """Sends now, or, while the worker is starting or down, not at all: once ready it is
        sent every run it has not reported done."""
        writer = self._writer
        if self._connected and writer is not None and not writer.is_closing():
            write_message(writer, *message)

    def _close_channel(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
