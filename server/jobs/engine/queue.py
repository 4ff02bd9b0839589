"""The job queue: a bounded FIFO queue, a fixed number of lanes (tasks that each take the next
operation off the queue and hand it to a ``JobExecution``: server/jobs/engine/executor.py, stages,
retries, rollback), queued cancellation, and resumption after a crash. The queue lives in the
serving process; the execution runs there too (``--job-process inline``) or in the job worker
process (server/jobs/worker/).

Lifecycle of one operation::

    submit -> QUEUED (event: INITIALIZED 0 %) -> a lane takes it -> RUNNING
           -> stages, each checkpointed in the store (last_completed_stage)
           -> COMPLETED 100 % stage event + terminal "complete" event (SUCCEEDED, response)
        or -> terminal "error" event (FAILED, Operation.error), working files removed
        or -> terminal "complete" event (CANCELLED), working files removed

On start, every QUEUED or RUNNING operation found in the store is queued again in creation
order; a RUNNING one resumes after its last completed stage. Server shutdown stops the lanes
without touching the operations, so they resume on the next start: only CancelOperation
cancels.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Mapping

import grpc
from google.protobuf.message import Message

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import ServiceError
from server.jobs.engine.admission import Admission
from server.jobs.engine.events import EventBus
from server.jobs.engine.executor import JobExecution, JobExecutor, RetryPolicy, finish_cancelled
from server.jobs.engine.pipeline import JobPipeline
from server.jobs.files.storage import StorageManager
from server.jobs.store import JobState, OperationRecord

__all__ = ["JobQueue", "QueueFull", "RetryPolicy"]

log = logging.getLogger("server.jobs")


class QueueFull(ServiceError):
    # ServiceError is a dataclass: its generated __init__ sets ``code`` on the instance (default
    # INTERNAL), which shadowed a class attribute here, so the client got INTERNAL. Pass it in.
    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.RESOURCE_EXHAUSTED)


class JobQueue:
    def __init__(
        self,
        bus: EventBus,
        storage: StorageManager,
        admission: Admission,
        pipelines: Mapping[int, JobPipeline],
        *,
        concurrency: int = 4,
        max_queued: int = 64,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        execution: JobExecution | None = None,
    ) -> None:
        """``concurrency``: lanes, so jobs running at once. ``execution`` runs what the lanes take
        off the queue; by default a JobExecutor on
        this event loop (built from bus, storage, admission, pipelines, retry and rng)."""
        if concurrency < 1 or max_queued < 1:
            raise ValueError("concurrency and max_queued must be >= 1")
        self.bus = bus
        self.store = bus.store
        self.storage = storage
        self.admission = admission
        self.pipelines = dict(pipelines)
        self.concurrency = concurrency
        self.max_queued = max_queued
        self.execution = execution or JobExecutor(
            bus, storage, admission, pipelines, retry=retry or RetryPolicy(), rng=rng
        )
        self._queue: collections.deque[str] = collections.deque()
        self._held = 0  # places held by submits between their queue check and their enqueue
        self._queue_changed = asyncio.Condition()
        self._running: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

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
        # Checked before validation too: a full server answers at once, without probing a video
        # or reading an upload first.
        if self._full():
            return await self._answer_full(kind, request_id)
        await pipeline.validate(request)
        if self._full():
            return await self._answer_full(kind, request_id)
        # A place is held from here (no await between the check and the hold), so submits that
        # validated concurrently cannot push the queue past max_queued.
        self._held += 1
        # Shielded: once the row may be committed (the store's thread finishes its write even
        # if this call is cancelled), the job must also be queued. A submit RPC cancelled here
        # (client deadline) left the operation QUEUED but in no queue: it never ran, and a retry
        # with the same request_id returned that stuck operation, until the next restart.
        return await asyncio.shield(asyncio.ensure_future(self._store_and_enqueue(kind, request, request_id)))

    def _full(self) -> bool:
        return len(self._queue) + self._held >= self.max_queued

    async def _answer_full(self, kind: int, request_id: str) -> OperationRecord:
        # A repeat of a submission that exists is answered with it, full queue or not: the
        # client is retrying a call whose answer it lost, and its job is already in line.
        existing = await self.store.find_request(request_id, kind) if request_id else None
        if existing is not None:
            return existing
        raise QueueFull(f"the job queue is full ({self.max_queued} jobs waiting); retry later or raise --max-queued-jobs")

    async def _store_and_enqueue(self, kind: int, request: Message, request_id: str) -> OperationRecord:
        """Runs holding a place (``_held``); the place passes to the queue with the job, or is freed."""
        queued = False
        try:
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
            await self._enqueue(op.name, from_hold=True)
            queued = True
            log.info("job queued", extra={"operation": op.name, "kind": jobs_pb2.JobKind.Name(kind), "position": position})
            return await self.store.get_operation(op.name)
        finally:
            if not queued:
                self._held -= 1  # a repeat or a failure: the place is free again

    async def cancel(self, name: str) -> OperationRecord:
        """Requests cancellation: a queued job ends CANCELLED at once; a running one is stopped
        (its model slots freed, D-ID polling stopped) and ends CANCELLED."""
        op = await self.store.request_cancel(name)
        if op.done:
            return op
        if name in self._queue:
            self._queue.remove(name)
            await finish_cancelled(self.bus, self.storage, op, None)
        elif name in self._running:
            await self.execution.cancel(name)
        return await self.store.get_operation(name)

    async def start(self) -> None:
        """Re-queues what a previous process left unfinished, then starts the lanes."""
        for op in await self.store.unfinished_operations():
            if op.cancel_requested:
                await finish_cancelled(self.bus, self.storage, op, None)
                continue
            log.info(
                "resuming job after restart",
                extra={"operation": op.name, "state": op.state.name, "last_completed_stage": op.last_completed_stage},
            )
            if op.state == JobState.RUNNING:
                # It waits for a lane again: say so (a lane moves it back to RUNNING).
                await self.store.update_operation(op.name, state=JobState.QUEUED, message="queued again after a restart")
            self._queue.append(op.name)
        await self.execution.start()
        self._tasks = [asyncio.create_task(self._lane(), name=f"job-lane-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        """Stops the lanes; running jobs stay RUNNING in the store and resume on restart."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.execution.stop()

    # ------------------------------------------------------------------ lanes

    async def _enqueue(self, name: str, *, from_hold: bool = False) -> None:
        async with self._queue_changed:
            self._queue.append(name)
            if from_hold:
                self._held -= 1  # in the same step: the job is never counted in both
            self._queue_changed.notify()

    async def _lane(self) -> None:
        while True:
            async with self._queue_changed:
                await self._queue_changed.wait_for(lambda: bool(self._queue))
                name = self._queue.popleft()
            self._running.add(name)
            try:
                await self.execution.run(name)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one job must not stop the lane
                log.exception("job execution failed", extra={"operation": name})
            finally:
                self._running.discard(name)
