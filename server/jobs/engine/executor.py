"""Runs one job to its end: its stages in order, each checkpointed in the store, whole-stage
retries with backoff, and the terminal event (SUCCEEDED; FAILED with rollback; CANCELLED).

The JobQueue (server/jobs/engine/queue.py) owns the queue and hands names to a ``JobExecution``:

* ``JobExecutor`` (here) runs them as tasks on the calling event loop. It is what the job
  worker process runs (server/jobs/worker/child.py, wired in server/app_worker.py), and what
  the serving process runs itself with ``--job-process inline``.
* ``WorkerProcess`` (server/jobs/worker/process.py) sends them to the job worker process.

Either way a job reports through an ``EventSink``: the EventBus in the serving process, or the
worker's forwarder, which stores each event and hands it to the serving process's EventBus.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.engine.admission import Admission
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobCancelled, JobFailure, from_os_error
from server.jobs.engine.definition import JobDefinition, Stage
from server.jobs.files.artifacts import artifact_proto, remove_files
from server.jobs.files.storage import StorageManager
from server.jobs.store import (
    EventRecord,
    JobState,
    JobStore,
    JobStoreUnavailableError,
    LeaseLostError,
    OperationRecord,
    OperationUpdate,
)

__all__ = ["EventSink", "JobExecution", "JobExecutor", "RetryPolicy", "finish_cancelled", "workdir_of"]

log = logging.getLogger("server.jobs")

T = TypeVar("T")


class EventSink(Protocol):
    """Where a job's events go: stored (durable) first, then handed to watchers."""

    store: JobStore

    async def emit(
        self,
        name: str,
        event_type: str,
        payload: bytes,
        *,
        terminal: bool | None = None,
        update: OperationUpdate | None = None,
        epoch: int | None = None,
    ) -> EventRecord: ...


class JobExecution(Protocol):
    """What the JobQueue hands a dequeued operation to."""

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stops every running job; each stays RUNNING in the store and resumes on restart."""
        ...

    async def run(self, name: str, epoch: int | None = None) -> None:
        """Runs the operation until it is SUCCEEDED, FAILED or CANCELLED. Cancelling the caller
        (server shutdown, or the lease lost) stops the job and leaves it RUNNING, to resume
        wherever it is claimed next. ``epoch``: the lease the JobQueue claimed it with; every
        write of the job carries it (fencing), and once the store refuses one (LeaseLostError:
        another replica took the job over) the job stops without writing anything more."""
        ...

    async def cancel(self, name: str) -> None:
        """Stops a running operation (model slots freed, D-ID polling stopped); returns once it
        is CANCELLED (or had already ended). Its cancel_requested flag is already stored."""
        ...


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff between whole-stage attempts: full jitter on base * 2**(attempt-1), capped."""

    base_s: float = 1.0
    cap_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.cap_s)
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))


def workdir_of(storage: StorageManager, name: str) -> Path:
    """The job's scratch folder: processed/<id>/work. Artifacts kept in the processed tier sit
    beside it (processed/<id>/<name>), so removing the scratch folder keeps them."""
    workdir = storage.job_dir(name) / "work"
    workdir.mkdir(exist_ok=True)
    return workdir


class JobExecutor:
    """Runs jobs as tasks on this event loop (see the module docstring)."""

    def __init__(
        self,
        bus: EventSink,
        storage: StorageManager,
        admission: Admission,
        definitions: Mapping[int, JobDefinition],
        *,
        retry: RetryPolicy = RetryPolicy(),
        rng: random.Random | None = None,
    ) -> None:
        self.bus = bus
        self.store = bus.store
        self.storage = storage
        self.admission = admission
        self.definitions = dict(definitions)
        self.retry = retry
        self._rng = rng or random.Random()
        self._tasks: dict[str, tuple[asyncio.Task[None], JobContext | None]] = {}
        self._epochs: dict[str, int | None] = {}
        self._cancelled: set[str] = set()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        tasks = [task for task, _ in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def running(self) -> list[str]:
        return list(self._tasks)

    async def run(self, name: str, epoch: int | None = None) -> None:
        task = asyncio.create_task(self._run(name, epoch), name=f"job {name}")
        self._tasks[name] = (task, None)
        self._epochs[name] = epoch
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():  # the caller is being stopped: stop the job too
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
            # The job task is done (its own cancellation ends here), but stop() may have
            # cancelled the caller in the same instant the job finished: the caller must
            # still stop, or stop()'s gather waits for it forever.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        finally:
            self._tasks.pop(name, None)
            self._epochs.pop(name, None)
            self._cancelled.discard(name)

    async def cancel(self, name: str) -> None:
        entry = self._tasks.get(name)
        if entry is None:
            return
        task, ctx = entry
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
            op = await self.store.get_operation(name)
            with contextlib.suppress(LeaseLostError):  # taken over meanwhile: its new holder cancels it
                await finish_cancelled(self.bus, self.storage, op, None, epoch=self._epochs.get(name))

    async def _run(self, name: str, epoch: int | None) -> None:
        op = await self.store.get_operation(name)
        if op.done:
            return
        if epoch is not None and op.lease_epoch != epoch:
            return  # claimed again since (this replica froze between its claim and now)
        if epoch is not None and op.last_sequence == 0:
            # Claimed before its submitter wrote the "queued" event; that write is fenced at
            # epoch 0, so it is refused now and this one takes its place (every history starts
            # with INITIALIZED).
            queued = jobs_pb2.StageUpdate(stage=jobs_pb2.JOB_STAGE_INITIALIZED, percent=0.0, message="queued (position 0)")
            await self.bus.emit(name, "stage_update", queued.SerializeToString(), epoch=epoch)
        try:
            ctx = self._context(op, await self.store.get_request(name))
        except (LeaseLostError, JobStoreUnavailableError):
            raise  # not the job's fault: it starts again at the next claim
        except Exception as exc:
            # Disk full, an unreadable state file, a request this version cannot parse: fail the
            # operation instead of leaving it QUEUED/RUNNING for ever.
            log.exception("job could not start", extra={"operation": name})
            error_class = jobs_pb2.ERROR_CLASS_RESOURCE if isinstance(exc, OSError) else jobs_pb2.ERROR_CLASS_PERMANENT
            failure = JobFailure(
                error_class, "job_start_failed", f"the job could not start: {type(exc).__name__}: {exc}"
            )
            with contextlib.suppress(LeaseLostError):
                await self._emit_failed(name, jobs_pb2.JOB_STAGE_INITIALIZED, failure, epoch)
            return
        self._tasks[name] = (self._tasks[name][0], ctx)
        definition = self.definitions[op.kind]
        handed_over = False
        try:
            # Cancelled before it got here (a cancel landing between the claim and this task):
            # no stage runs.
            ctx.check_cancelled()
            if op.state == JobState.QUEUED:
                await self.store.update_operation(name, state=JobState.RUNNING, epoch=epoch)
            stages = list(definition.stages())
            done = [s.checkpoint for s in stages]
            start = done.index(op.last_completed_stage) + 1 if op.last_completed_stage in done else 0
            for stage in stages[start:]:
                ctx.checkpoint, ctx.checkpoint_stored = stage.checkpoint, False
                await self._run_stage(stage, ctx)
                if not ctx.checkpoint_stored:  # the stage did not end with a completing event
                    await ctx.sync_workdir()
                    await self.store.update_operation(name, last_completed_stage=stage.checkpoint, epoch=epoch)
            response = await definition.response(ctx)
            await self._finish_succeeded(ctx, response)
        except (LeaseLostError, JobStoreUnavailableError) as exc:
            # Fencing: another replica holds the job now (or may by the time the store is back),
            # so this replica writes nothing more to it, not even a failure, and leaves its
            # working folder to the new holder (one shared storage root). The JobQueue frees the
            # lease where it still holds it, so the job resumes after its last completed stage.
            log.warning("job stopped: %s", exc, extra={"operation": name, "epoch": epoch})
            # The working folder's keep marker is the new holder's now (one shared root).
            handed_over = isinstance(exc, LeaseLostError)
            raise
        except (JobCancelled, asyncio.CancelledError):
            if name in self._cancelled or ctx.cancel_requested:
                op = await self.store.get_operation(name)
                await finish_cancelled(self.bus, self.storage, op, ctx, epoch=epoch)
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
            if not handed_over:
                self.storage.release(ctx.workdir)

    def _context(self, op: OperationRecord, request: bytes) -> JobContext:
        definition = self.definitions[op.kind]
        workdir = workdir_of(self.storage, op.name)
        self.storage.keep(workdir)
        return JobContext(
            operation=op,
            request=definition.request_type.FromString(request),
            bus=self.bus,
            storage=self.storage,
            admission=self.admission,
            workdir=workdir,
            state=JobContext.load_state(workdir),
            cancel_requested=op.cancel_requested,
            epoch=self._epochs.get(op.name),
        )

    async def _run_stage(self, stage: Stage, ctx: JobContext) -> None:
        attempt = 1  # whole-stage attempts, bounded by stage.max_attempts
        ctx.failed_attempts = 0
        while True:
            try:
                await _disk_full_classified(stage.run(ctx))
                return
            except JobFailure as failure:
                if not failure.retryable or attempt >= stage.max_attempts:
                    failure.attempts = ctx.failed_attempts + 1  # this failure included
                    if stage.fallback is not None and await _disk_full_classified(stage.fallback(ctx, failure)):
                        log.warning(
                            "job stage failed; continuing without it (graceful degradation)",
                            extra={"operation": ctx.name, "stage": jobs_pb2.JobStage.Name(ctx.current_stage),
                                   "error": str(failure)},
                        )
                        return
                    raise
                delay = self.retry.delay(attempt, self._rng, failure.retry_after_s)
                log.warning(
                    "job stage failed, retrying",
                    extra={
                        "operation": ctx.name,
                        "stage": jobs_pb2.JobStage.Name(ctx.current_stage),
                        "attempt": attempt,
                        "delay_s": delay,
                        "error": str(failure),
                    },
                )
                await ctx.retrying(failure, delay)
                await asyncio.sleep(delay)
                attempt += 1

    async def _finish_succeeded(self, ctx: JobContext, response: Message) -> None:
        artifacts = [artifact_proto(a) for a in await self.store.list_artifacts(ctx.name)]
        await ctx.stage(jobs_pb2.JOB_STAGE_COMPLETED, 100.0, "completed")
        complete = jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_SUCCEEDED, artifacts=artifacts)
        await self.bus.emit(
            ctx.name,
            "complete",
            complete.SerializeToString(),
            update=OperationUpdate(
                state=JobState.SUCCEEDED, response=response.SerializeToString(), message="completed"
            ),
            epoch=ctx.epoch,
        )
        # Intermediate files go; artifacts live in their own tier.
        ctx.remove_workdir()
        log.info("job succeeded", extra={"operation": ctx.name})

    async def _finish_failed(self, ctx: JobContext, failure: JobFailure) -> None:
        await self._emit_failed(ctx.name, ctx.current_stage, failure, ctx.epoch)
        await rollback(self.store, ctx)
        log.warning("job failed", extra={"operation": ctx.name, "kind": failure.kind, "error": failure.description})

    async def _emit_failed(self, name: str, stage: int, failure: JobFailure, epoch: int | None) -> None:
        """The terminal error event, with the operation moved to FAILED in the same commit."""
        error = jobs_pb2.JobError(
            error_class=failure.error_class,  # type: ignore[arg-type]
            stage=stage,  # type: ignore[arg-type]
            kind=failure.kind,
            description=failure.description,
            will_retry=False,
            attempt=failure.attempts,
            person=failure.person,
        )
        message = f"{failure.kind}: {failure.description}"
        await self.bus.emit(
            name,
            "error",
            error.SerializeToString(),
            terminal=True,
            update=OperationUpdate(
                state=JobState.FAILED,
                stage=jobs_pb2.JOB_STAGE_FAILED,
                message=message,
                error=(failure.code.value[0], message),
            ),
            epoch=epoch,
        )


async def finish_cancelled(
    bus: EventSink, storage: StorageManager, op: OperationRecord, ctx: JobContext | None, *, epoch: int | None = None
) -> None:
    """The terminal CANCELLED event (unless the operation already ended); the job's files go.
    ``epoch``: the lease the writer holds (LeaseLostError, and nothing removed, once another
    replica's claim moved it on)."""
    if op.done:
        return
    complete = jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_CANCELLED)
    await bus.emit(
        op.name,
        "complete",
        complete.SerializeToString(),
        update=OperationUpdate(
            state=JobState.CANCELLED,
            stage=jobs_pb2.JOB_STAGE_CANCELLED,
            message="cancelled by the client",
            error=(grpc.StatusCode.CANCELLED.value[0], "cancelled by the client"),
        ),
        epoch=epoch,
    )
    if ctx is not None:
        await rollback(bus.store, ctx)
    else:
        shutil.rmtree(workdir_of(storage, op.name), ignore_errors=True)
        # No context (cancel requested before a restart, or before the task started): the
        # job may still have placed artifacts in an earlier run; they go as in rollback.
        await remove_artifacts(bus.store, op.name)
    log.info("job cancelled", extra={"operation": op.name})


async def rollback(store: JobStore, ctx: JobContext) -> None:
    """A failed or cancelled job leaves nothing behind: working files and any artifact
    already placed are deleted (their rows stay only as history of what was attempted)."""
    ctx.remove_workdir()
    await remove_artifacts(store, ctx.name)


async def _disk_full_classified(work: Awaitable[T]) -> T:
    """A full disk inside ``work`` as the RESOURCE failure it is; any other OSError stays a bug."""
    try:
        return await work
    except OSError as exc:
        disk_full = from_os_error(exc)
        if disk_full is None:
            raise
        raise disk_full from exc


async def remove_artifacts(store: JobStore, name: str) -> None:
    await asyncio.to_thread(remove_files, [record.path for record in await store.list_artifacts(name)])
