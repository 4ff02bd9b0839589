"""Runs jobs: a bounded FIFO queue, a fixed number of workers, whole-stage retries, failure
rollback, cancellation, and resumption after a crash.

Lifecycle of one operation::

    submit -> QUEUED (event: INITIALIZED 0 %) -> a worker takes it -> RUNNING
           -> stages, each checkpointed in the store (last_completed_stage)
           -> COMPLETED 100 % stage event + terminal "complete" event (SUCCEEDED, response)
        or -> terminal "error" event (FAILED, Operation.error), working files removed
        or -> terminal "complete" event (CANCELLED), working files removed

On start, every QUEUED or RUNNING operation found in the store is queued again in creation
order; a RUNNING one resumes after its last completed stage. Server shutdown stops workers
without touching the operations, so they resume on the next start: only CancelOperation
cancels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import ServiceError
from server.jobs.admission import Admission
from server.jobs.artifacts import artifact_proto
from server.jobs.context import JobContext
from server.jobs.events import EventBus
from server.jobs.failures import JobCancelled, JobFailure
from server.jobs.pipeline import JobPipeline, Stage
from server.jobs.storage import StorageManager
from server.jobs.store import JobState, OperationRecord, OperationUpdate

__all__ = ["JobRunner", "QueueFull", "RetryPolicy"]

log = logging.getLogger("server.jobs")


class QueueFull(ServiceError):
    # ServiceError is a dataclass: its generated __init__ sets ``code`` on the instance (default
    # INTERNAL), which shadowed a class attribute here, so the client got INTERNAL. Pass it in.
    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between whole-stage attempts: full jitter on base * 2**(attempt-1), capped."""

    base_s: float = 1.0
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.cap_s)
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))


class JobRunner:
    def __init__(
        self,
        bus: EventBus,
        storage: StorageManager,
        admission: Admission,
        pipelines: Mapping[int, JobPipeline],
        *,
        workers: int = 4,
        max_queued: int = 64,
        retry: RetryPolicy = RetryPolicy(),
        rng: random.Random | None = None,
    ) -> None:
        if workers < 1 or max_queued < 1:
            raise ValueError("workers and max_queued must be >= 1")
        self.bus = bus
        self.store = bus.store
        self.storage = storage
        self.admission = admission
        self.pipelines = dict(pipelines)
        self.workers = workers
        self.max_queued = max_queued
        self.retry = retry
        self._rng = rng or random.Random()
        self._queue: collections.deque[str] = collections.deque()
        self._queue_changed = asyncio.Condition()
        self._running: dict[str, tuple[asyncio.Task[None], JobContext | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._cancelled: set[str] = set()

    # ------------------------------------------------------------------ public surface

    def pipeline(self, kind: int) -> JobPipeline:
        return self.pipelines[kind]

    def queue_position(self, name: str) -> int:
        """0 = next to run; -1 when not queued."""
        try:
            return self._queue.index(name)
        except ValueError:
            return -1

    async def submit(self, kind: int, request: Message, request_id: str = "") -> OperationRecord:
        """Validates, stores and queues a job; a repeated request_id returns the first operation."""
        pipeline = self.pipelines[kind]
        await pipeline.validate(request)
        if len(self._queue) >= self.max_queued:
            raise QueueFull(
                f"the job queue is full ({self.max_queued} jobs waiting); retry later or raise --max-queued-jobs"
            )
        # Shielded: once the row may be committed (the store's thread finishes its write even
        # if this call is cancelled), the job must also be queued. A submit RPC cancelled here
        # (client deadline) left the operation QUEUED but in no queue: it never ran, and a retry
        # with the same request_id returned that stuck operation, until the next restart.
        return await asyncio.shield(asyncio.ensure_future(self._store_and_enqueue(kind, request, request_id)))

    async def _store_and_enqueue(self, kind: int, request: Message, request_id: str) -> OperationRecord:
        op, created = await self.store.create_operation(
            kind=kind,
            request=request.SerializeToString(),
            request_id=request_id or None,
            stage=jobs_pb2.JOB_STAGE_INITIALIZED,
            message="queued",
        )
        if not created:
            return op
        position = len(self._queue)
        payload = jobs_pb2.StageUpdate(
            stage=jobs_pb2.JOB_STAGE_INITIALIZED, percent=0.0, message=f"queued (position {position})"
        )
        await self.bus.emit(op.name, "stage_update", payload.SerializeToString())
        await self._enqueue(op.name)
        log.info("job queued", extra={"operation": op.name, "kind": jobs_pb2.JobKind.Name(kind), "position": position})
        return await self.store.get_operation(op.name)

    async def cancel(self, name: str) -> OperationRecord:
        """Requests cancellation: a queued job ends CANCELLED at once; a running one is stopped
        (its model slots freed, D-ID polling stopped) and ends CANCELLED."""
        op = await self.store.request_cancel(name)
        if op.done:
            return op
        if name in self._queue:
            self._queue.remove(name)
            await self._finish_cancelled(op, None)
        elif name in self._running:
            task, ctx = self._running[name]
            # Only the first canceller cancels the task and finishes the operation. A repeated
            # CancelOperation (a client retry) used to cancel the task again while it was
            # writing its CANCELLED event; the task then ended cancelled, and both callers saw
            # the operation unfinished and each appended a terminal "complete" event.
            first = name not in self._cancelled
            if first:
                if ctx is not None:
                    ctx.cancel_requested = True
                self._cancelled.add(name)
                task.cancel()
            # asyncio.wait, not gather: a CancelOperation call cancelled by its client must not
            # cancel the job task again while it writes its CANCELLED event.
            await asyncio.wait([task])
            if first and task.cancelled():
                # Cancelled before _run reached its try block (the task had not started, or was
                # still reading the operation), so nothing recorded the cancellation: without
                # this the operation stayed QUEUED with cancel_requested set until a restart.
                await self._finish_cancelled(await self.store.get_operation(name), None)
        return await self.store.get_operation(name)

    async def start(self) -> None:
        """Re-queues what a previous process left unfinished, then starts the workers."""
        for op in await self.store.unfinished_operations():
            if op.cancel_requested:
                await self._finish_cancelled(op, None)
                continue
            log.info(
                "resuming job after restart",
                extra={"operation": op.name, "state": op.state.name, "last_completed_stage": op.last_completed_stage},
            )
            if op.state == JobState.RUNNING:
                # It waits for a worker again: say so (a worker moves it back to RUNNING).
                await self.store.update_operation(op.name, state=JobState.QUEUED, message="queued again after a restart")
            self._queue.append(op.name)
        self._tasks = [asyncio.create_task(self._worker(), name=f"job-worker-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        """Stops the workers; running jobs stay RUNNING in the store and resume on restart."""
        for task in self._tasks:
            task.cancel()
        for task, _ in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t, _ in self._running.values()), return_exceptions=True)
        self._tasks = []

    # ------------------------------------------------------------------ workers

    def _workdir(self, name: str) -> Path:
        """The job's scratch folder: processed/<id>/work. Artifacts kept in the processed tier
        sit beside it (processed/<id>/<name>), so removing the scratch folder keeps them."""
        workdir = self.storage.job_dir(name) / "work"
        workdir.mkdir(exist_ok=True)
        return workdir

    async def _enqueue(self, name: str) -> None:
        async with self._queue_changed:
            self._queue.append(name)
            self._queue_changed.notify()

    async def _worker(self) -> None:
        while True:
            async with self._queue_changed:
                await self._queue_changed.wait_for(lambda: bool(self._queue))
                name = self._queue.popleft()
            task = asyncio.create_task(self._run(name), name=f"job {name}")
            self._running[name] = (task, None)
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():  # the worker itself is being stopped: stop the job too
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise
                # The job task is done (its own cancellation ends here), but stop() may have
                # cancelled this worker in the same instant the job finished: the worker must
                # still stop, or stop()'s gather waits for it forever.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:  # noqa: BLE001, S110 - _run logs; a bug in one job must not stop the worker
                pass
            finally:
                self._running.pop(name, None)
                self._cancelled.discard(name)

    async def _run(self, name: str) -> None:
        op = await self.store.get_operation(name)
        if op.done:
            return
        try:
            ctx = self._context(op)
        except Exception as exc:
            # Disk full, an unreadable state file, a request this version cannot parse: fail the
            # operation instead of leaving it QUEUED/RUNNING for ever.
            log.exception("job could not start", extra={"operation": name})
            error_class = jobs_pb2.ERROR_CLASS_RESOURCE if isinstance(exc, OSError) else jobs_pb2.ERROR_CLASS_PERMANENT
            failure = JobFailure(error_class, "job_start_failed", f"the job could not start: {type(exc).__name__}: {exc}")
            await self._emit_failed(name, jobs_pb2.JOB_STAGE_INITIALIZED, failure)
            return
        self._running[name] = (self._running[name][0], ctx)
        pipeline = self.pipelines[op.kind]
        try:
            if op.state == JobState.QUEUED:
                await self.store.update_operation(name, state=JobState.RUNNING)
            stages = list(pipeline.stages())
            done = [s.checkpoint for s in stages]
            start = done.index(op.last_completed_stage) + 1 if op.last_completed_stage in done else 0
            for stage in stages[start:]:
                await self._run_stage(stage, ctx)
                await self.store.update_operation(name, last_completed_stage=stage.checkpoint)
            response = await pipeline.response(ctx)
            await self._finish_succeeded(ctx, response)
        except (JobCancelled, asyncio.CancelledError):
            if name in self._cancelled or ctx.cancel_requested:
                await self._finish_cancelled(await self.store.get_operation(name), ctx)
                return
            raise  # shutdown: leave the operation RUNNING so it resumes
        except JobFailure as failure:
            await self._finish_failed(ctx, failure)
        except Exception as exc:
            log.exception("job failed with an unexpected error", extra={"operation": name})
            failure = JobFailure(
                jobs_pb2.ERROR_CLASS_PERMANENT,
                "internal",
                f"internal error ({type(exc).__name__}: {exc}); this is a server bug, please report it",
                code=grpc.StatusCode.INTERNAL,
            )
            await self._finish_failed(ctx, failure)
        finally:
            self.storage.release(ctx.workdir)

    def _context(self, op: OperationRecord) -> JobContext:
        pipeline = self.pipelines[op.kind]
        workdir = self._workdir(op.name)
        self.storage.keep(workdir)
        return JobContext(
            operation=op,
            request=pipeline.request_type.FromString(op.request),
            bus=self.bus,
            storage=self.storage,
            admission=self.admission,
            workdir=workdir,
            state=JobContext.load_state(workdir),
            cancel_requested=op.cancel_requested,
        )

    async def _run_stage(self, stage: Stage, ctx: JobContext) -> None:
        attempt = 1  # whole-stage attempts, bounded by stage.max_attempts
        ctx.failed_attempts = 0
        while True:
            try:
                await stage.run(ctx)
                return
            except JobFailure as failure:
                if not failure.retryable or attempt >= stage.max_attempts:
                    failure.attempts = ctx.failed_attempts + 1  # this failure included
                    raise
                delay = self.retry.delay(attempt, self._rng, failure.retry_after_s)
                log.warning(
                    "job stage failed, retrying",
                    extra={"operation": ctx.name, "stage": jobs_pb2.JobStage.Name(ctx.current_stage), "attempt": attempt, "delay_s": delay, "error": str(failure)},
                )
                await ctx.retrying(failure, delay)
                await asyncio.sleep(delay)
                attempt += 1

    # ------------------------------------------------------------------ terminal events

    async def _finish_succeeded(self, ctx: JobContext, response: Message) -> None:
        artifacts = [artifact_proto(a) for a in await self.store.list_artifacts(ctx.name)]
        await ctx.stage(jobs_pb2.JOB_STAGE_COMPLETED, 100.0, "completed")
        complete = jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_SUCCEEDED, artifacts=artifacts)
        await self.bus.emit(
            ctx.name,
            "complete",
            complete.SerializeToString(),
            update=OperationUpdate(state=JobState.SUCCEEDED, response=response.SerializeToString(), message="completed"),
        )
        # Intermediate files go; artifacts live in their own tier.
        ctx.remove_workdir()
        log.info("job succeeded", extra={"operation": ctx.name})

    async def _finish_failed(self, ctx: JobContext, failure: JobFailure) -> None:
        await self._emit_failed(ctx.name, ctx.current_stage, failure)
        await self._rollback(ctx)
        log.warning("job failed", extra={"operation": ctx.name, "kind": failure.kind, "error": failure.description})

    async def _emit_failed(self, name: str, stage: int, failure: JobFailure) -> None:
        """The terminal error event, with the operation moved to FAILED in the same commit."""
        error = jobs_pb2.JobError(
            error_class=failure.error_class,  # type: ignore[arg-type]
            stage=stage,  # type: ignore[arg-type]
            kind=failure.kind,
            description=failure.description,
            will_retry=False,
            attempt=failure.attempts,
        )
        message = f"{failure.kind}: {failure.description}"
        await self.bus.emit(
            name,
            "error",
            error.SerializeToString(),
            terminal=True,
            update=OperationUpdate(
                state=JobState.FAILED, stage=jobs_pb2.JOB_STAGE_FAILED, message=message, error=(failure.code.value[0], message)
            ),
        )

    async def _finish_cancelled(self, op: OperationRecord, ctx: JobContext | None) -> None:
        if op.done:
            return
        complete = jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_CANCELLED)
        await self.bus.emit(
            op.name,
            "complete",
            complete.SerializeToString(),
            update=OperationUpdate(
                state=JobState.CANCELLED,
                stage=jobs_pb2.JOB_STAGE_CANCELLED,
                message="cancelled by the client",
                error=(grpc.StatusCode.CANCELLED.value[0], "cancelled by the client"),
            ),
        )
        if ctx is not None:
            await self._rollback(ctx)
        else:
            shutil.rmtree(self._workdir(op.name), ignore_errors=True)
            # No context (cancel requested before a restart, or before the task started): the
            # job may still have placed artifacts in an earlier run; they go as in _rollback.
            await self._remove_artifacts(op.name)
        log.info("job cancelled", extra={"operation": op.name})

    async def _rollback(self, ctx: JobContext) -> None:
        """A failed or cancelled job leaves nothing behind: working files and any artifact
        already placed are deleted (their rows stay only as history of what was attempted)."""
        ctx.remove_workdir()
        await self._remove_artifacts(ctx.name)

    async def _remove_artifacts(self, name: str) -> None:
        for record in await self.store.list_artifacts(name):
            await asyncio.to_thread(_unlink, record.path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
