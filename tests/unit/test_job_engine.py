"""The job engine (server/jobs/engine/) through its JobQueue: FIFO queue, admission slots,
whole-stage retries, failure rollback, cancellation, resumption after a restart, and the
operation row following the event stream.

Pure unit tests: no Triton, no gRPC. A real SqliteJobStore and StorageManager on tmp_path, and
fake job definitions whose stages are small async functions the test drives with asyncio.Event gates
(never sleeps: every wait is on an event, bounded by asyncio.wait_for).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs import EventBus, EventRecord, JobState, OperationRecord, OperationUpdate, SqliteJobStore
from server.jobs.engine.admission import Admission
from server.jobs.engine.context import JobContext
from server.jobs.engine.failures import JobFailure
from server.jobs.engine.definition import Stage
from server.jobs.engine.queue import JobQueue, QueueFull, RetryPolicy
from server.jobs.files.durable import write_atomically
from server.jobs.files.storage import KEEP_MARKER, StorageConfig, StorageManager

SEGMENT = jobs_pb2.JOB_KIND_SEGMENT_VIDEO
DECODING = jobs_pb2.JOB_STAGE_DECODING
TRACKING = jobs_pb2.JOB_STAGE_TRACKING
WRITING = jobs_pb2.JOB_STAGE_WRITING_ARTIFACTS
FAST_RETRY = RetryPolicy(base_s=0.001, cap_s=0.01)
TIMEOUT_S = 5.0  # a bound for waits that normally end in milliseconds

StageFn = Callable[[JobContext], Awaitable[None]]

_PAYLOAD_TYPES = {
    "stage_update": jobs_pb2.StageUpdate,
    "progress_update": jobs_pb2.ProgressUpdate,
    "error": jobs_pb2.JobError,
    "complete": jobs_pb2.JobComplete,
}


# ---------------------------------------------------------------------- fakes and helpers


class FakePipeline:
    """A JobDefinition whose stages are given by the test. The request's ``server_path`` is used
    as the job's label, so one stage function can behave differently per job."""

    kind = SEGMENT
    request_type = jobs_pb2.SegmentVideoRequest
    response_type = jobs_pb2.SegmentVideoResponse

    def __init__(self, stages: list[Stage]) -> None:
        self._stages = stages

    def stages(self) -> list[Stage]:
        return self._stages

    async def validate(self, request: jobs_pb2.SegmentVideoRequest) -> None:
        return None

    async def response(self, ctx: JobContext) -> jobs_pb2.SegmentVideoResponse:
        return jobs_pb2.SegmentVideoResponse(frames_processed=int(ctx.state.get("frames", 0)))


def req(label: str) -> jobs_pb2.SegmentVideoRequest:
    return jobs_pb2.SegmentVideoRequest(server_path=label)


def label(ctx: JobContext) -> str:
    return ctx.request.server_path  # type: ignore[attr-defined]


def decode(event: EventRecord):
    return _PAYLOAD_TYPES[event.event_type].FromString(event.payload)


async def wait(event: asyncio.Event, what: str = "event") -> None:
    try:
        await asyncio.wait_for(event.wait(), TIMEOUT_S)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


class Env:
    """One store and one storage folder; queues built on them are stopped at the end."""

    def __init__(self, tmp_path: Path, store: SqliteJobStore) -> None:
        self.store = store
        self.storage = StorageManager(StorageConfig(root=tmp_path / "storage"))
        self.queues: list[JobQueue] = []

    def queue(
        self,
        *stages: Stage,
        slots: dict[str, int] | None = None,
        concurrency: int = 1,
        max_queued: int = 64,
    ) -> JobQueue:
        # A fresh EventBus per queue, as a restarted process would have.
        queue = JobQueue(
            EventBus(self.store),
            self.storage,
            Admission(slots or {"detection": 2}),
            {SEGMENT: FakePipeline(list(stages))},
            concurrency=concurrency,
            max_queued=max_queued,
            retry=FAST_RETRY,
            rng=random.Random(0),
        )
        self.queues.append(queue)
        return queue

    def workdir(self, name: str) -> Path:
        """The job's scratch folder, computed without creating it (job_dir() would)."""
        return self.storage.root / "processed" / name.rsplit("/", 1)[-1] / "work"


@contextlib.asynccontextmanager
async def environment(tmp_path: Path, store: SqliteJobStore | None = None) -> AsyncIterator[Env]:
    store = store or SqliteJobStore(tmp_path / "jobs.db")
    await store.open()
    env = Env(tmp_path, store)
    try:
        yield env
    finally:
        for queue in env.queues:
            await asyncio.wait_for(queue.stop(), TIMEOUT_S)
        await store.close()


async def wait_done(queue: JobQueue, name: str) -> tuple[OperationRecord, list[EventRecord]]:
    """Watches the operation to its terminal event (history, then live) and returns the final
    record and every event the watcher saw."""

    async def drain() -> list[EventRecord]:
        seen: list[EventRecord] = []
        async with queue.bus.subscribe(name) as sub:
            async for item in sub:
                if isinstance(item, EventRecord):
                    seen.append(item)
        return seen

    try:
        events = await asyncio.wait_for(drain(), TIMEOUT_S)
    except TimeoutError:
        op = await queue.store.get_operation(name)
        raise AssertionError(f"{name} did not finish: {op.state.name} {op.message!r}") from None
    return await queue.store.get_operation(name), events


def error_events(events: list[EventRecord]) -> list[jobs_pb2.JobError]:
    return [decode(e) for e in events if e.event_type == "error"]


def code_of(status: grpc.StatusCode) -> int:
    return status.value[0]


# ---------------------------------------------------------------------- queue


async def test_fifo_order_queue_position_and_queue_full(tmp_path: Path) -> None:
    order: list[str] = []
    started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def work(ctx: JobContext) -> None:
        order.append(label(ctx))
        started[label(ctx)].set()
        await gates[label(ctx)].wait()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work), concurrency=1, max_queued=3)
        await queue.start()
        a = await queue.submit(SEGMENT, req("a"))
        await wait(started["a"], "job a to start")
        b, c = [await queue.submit(SEGMENT, req(x)) for x in "bc"]
        d = await queue.submit(SEGMENT, req("d"), request_id="submit-d")

        assert [await queue.queue_position(op.name) for op in (a, b, c, d)] == [-1, 0, 1, 2]
        assert await queue.queue_position("operations/" + "0" * 32) == -1
        for op in (b, c, d):
            assert op.state == JobState.QUEUED
            assert (await env.store.get_operation(op.name)).state == JobState.QUEUED
        assert (await env.store.get_operation(a.name)).state == JobState.RUNNING
        # The submit event reports the position the job was queued at.
        queued = [decode((await env.store.events_after(op.name))[0]) for op in (b, c, d)]
        assert [(u.stage, u.percent, u.message) for u in queued] == [
            (jobs_pb2.JOB_STAGE_INITIALIZED, 0.0, f"queued (position {i})") for i in range(3)
        ]

        # Three waiting = max_queued: the next submit is refused and creates nothing.
        with pytest.raises(QueueFull) as refused:
            await queue.submit(SEGMENT, req("e"), request_id="refused")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        ops, _ = await env.store.list_operations(page_size=100)
        assert sorted(op.name for op in ops) == sorted(op.name for op in (a, b, c, d))
        # A retry of a submission already in line gets its operation back, full queue or not.
        again = await queue.submit(SEGMENT, req("d"), request_id="submit-d")
        assert again.name == d.name and await queue.queue_position(d.name) == 2
        assert len((await env.store.list_operations(page_size=100))[0]) == 4

        # Open the gates last-first: a single lane still runs them in submission order.
        for x in "dcba":
            gates[x].set()
        for op in (a, b, c, d):
            final, _ = await wait_done(queue, op.name)
            assert final.state == JobState.SUCCEEDED
        assert order == ["a", "b", "c", "d"]
        assert [await queue.queue_position(op.name) for op in (a, b, c, d)] == [-1] * 4


async def test_queue_limit_holds_for_concurrent_submits_and_a_full_queue_skips_validation(tmp_path: Path) -> None:
    """Validation awaits (a video probe, an upload read): submits validating together must not push the
    queue past max_queued, and once it is full a submit is refused without being validated."""
    validated: list[str] = []
    gate = asyncio.Event()

    class SlowValidation(FakePipeline):
        async def validate(self, request: jobs_pb2.SegmentVideoRequest) -> None:
            validated.append(request.server_path)
            await gate.wait()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, lambda ctx: asyncio.sleep(0)), max_queued=3)  # not started: jobs stay queued
        queue.definitions[SEGMENT] = SlowValidation(queue.definitions[SEGMENT].stages())
        submits = [asyncio.create_task(queue.submit(SEGMENT, req(x))) for x in "abcde"]
        await asyncio.sleep(0.05)
        assert sorted(validated) == list("abcde")  # all five are validating at once
        gate.set()
        results = await asyncio.gather(*submits, return_exceptions=True)
        assert sum(isinstance(r, OperationRecord) for r in results) == 3
        assert sum(isinstance(r, QueueFull) for r in results) == 2
        assert await env.store.count_waiting() == 3
        assert len((await env.store.list_operations(page_size=100))[0]) == 3
        with pytest.raises(QueueFull):
            await queue.submit(SEGMENT, req("f"))
        assert "f" not in validated


async def test_a_queued_job_is_not_counted_twice_while_its_submit_finishes(tmp_path: Path) -> None:
    # Submit a's last read is held open after its job is queued: the queue (1 of 2) still has room for b.
    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, lambda ctx: asyncio.sleep(0)), max_queued=2)  # not started: jobs stay queued
        gate, reads, real_get = asyncio.Event(), Counter(), env.store.get_operation

        async def first_read_held(name: str) -> OperationRecord:
            reads["n"] += 1
            if reads["n"] == 1:
                await gate.wait()
            return await real_get(name)

        env.store.get_operation = first_read_held  # type: ignore[method-assign]
        a = asyncio.create_task(queue.submit(SEGMENT, req("a")))
        while reads["n"] == 0:
            await asyncio.sleep(0.001)
        assert await env.store.count_waiting() == 1
        b = await queue.submit(SEGMENT, req("b"))
        gate.set()
        assert (await a).name != b.name and await env.store.count_waiting() == 2


async def test_repeated_request_id_returns_first_operation_and_runs_once(tmp_path: Path) -> None:
    runs: list[str] = []
    gate = asyncio.Event()

    async def work(ctx: JobContext) -> None:
        runs.append(ctx.name)
        await gate.wait()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work))
        first = await queue.submit(SEGMENT, req("a"), request_id="same")
        again = await queue.submit(SEGMENT, req("a"), request_id="same")  # not started: both queued
        assert again.name == first.name
        assert [op.name for op in await env.store.unfinished_operations()] == [first.name]
        assert (await env.store.get_operation(first.name)).last_sequence == 1  # one "queued" event
        await queue.start()
        gate.set()
        final, _ = await wait_done(queue, first.name)
        assert final.state == JobState.SUCCEEDED
        assert runs == [first.name]


# ---------------------------------------------------------------------- admission


async def test_admission_slots_bound_concurrency(tmp_path: Path) -> None:
    arrived = inside = max_inside = 0
    all_arrived, two_inside, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def work(ctx: JobContext) -> None:
        nonlocal arrived, inside, max_inside
        arrived += 1
        if arrived == 5:
            all_arrived.set()
        async with ctx.slot("detection"):
            inside += 1
            max_inside = max(max_inside, inside)
            if inside == 2:
                two_inside.set()
            await gate.wait()
            inside -= 1

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work), slots={"detection": 2}, concurrency=5)
        await queue.start()
        ops = [await queue.submit(SEGMENT, req(f"j{i}")) for i in range(5)]
        # Every job is running its stage; two hold the slots, three wait for one.
        await wait(all_arrived, "all five jobs to reach the slot")
        await wait(two_inside, "two jobs inside the slot")
        assert inside == 2
        assert queue.admission.in_use("detection") == 2
        gate.set()
        for op in ops:
            final, _ = await wait_done(queue, op.name)
            assert final.state == JobState.SUCCEEDED
        assert max_inside == 2
        assert queue.admission.in_use("detection") == 0


# ---------------------------------------------------------------------- retries and failures


async def test_recoverable_failure_is_retried_then_succeeds(tmp_path: Path) -> None:
    calls = 0

    async def flaky(ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        await ctx.stage(DECODING, 10.0, "decoding")
        if calls <= 2:
            raise JobFailure.recoverable("model_busy", "the detection model is busy")

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, flaky))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        final, events = await wait_done(queue, op.name)

    assert final.state == JobState.SUCCEEDED
    assert final.error is None
    assert calls == 3
    errors = error_events(events)
    assert [(e.will_retry, e.attempt) for e in errors] == [(True, 1), (True, 2)]
    for e in errors:
        assert e.error_class == jobs_pb2.ERROR_CLASS_RECOVERABLE
        assert e.kind == "model_busy"
        assert e.stage == DECODING
        assert "the detection model is busy" in e.description
    assert [e.terminal for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1].event_type == "complete"
    assert decode(events[-1]).state == jobs_pb2.JOB_STATE_SUCCEEDED


async def test_permanent_failure_fails_at_once_and_removes_workdir(tmp_path: Path) -> None:
    calls = 0
    wrote = asyncio.Event()
    workdirs: list[Path] = []

    async def bad_input(ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        await ctx.stage(DECODING, 5.0, "decoding")
        (ctx.workdir / "partial.bin").write_bytes(b"half a result")
        await ctx.save_state(frames=3)
        workdirs.append(ctx.workdir)
        wrote.set()
        raise JobFailure.permanent("no_person_found", "no person on the prompt frame; pick another frame")

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, bad_input))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        final, events = await wait_done(queue, op.name)
        assert wrote.is_set()
        assert workdirs == [env.workdir(op.name)]
        assert not env.workdir(op.name).exists()

    assert calls == 1  # never retried
    assert final.state == JobState.FAILED
    assert final.stage == jobs_pb2.JOB_STAGE_FAILED
    assert final.error is not None
    assert final.error[0] == code_of(grpc.StatusCode.INVALID_ARGUMENT)
    assert "no_person_found" in final.error[1]
    assert final.end_time is not None
    errors = error_events(events)
    assert len(errors) == 1
    (error,) = errors
    assert events[-1].event_type == "error" and events[-1].terminal
    assert not error.will_retry
    assert error.error_class == jobs_pb2.ERROR_CLASS_PERMANENT
    assert error.kind == "no_person_found"
    assert error.stage == DECODING
    assert "pick another frame" in error.description
    assert final.last_sequence == events[-1].sequence


async def test_retries_exhausted_fails(tmp_path: Path) -> None:
    calls = 0

    async def always_busy(ctx: JobContext) -> None:
        nonlocal calls
        calls += 1
        raise JobFailure.recoverable("model_busy", "still busy")

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, always_busy, max_attempts=2))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        final, events = await wait_done(queue, op.name)
        assert not env.workdir(op.name).exists()

    assert calls == 2
    assert final.state == JobState.FAILED
    assert final.error is not None and final.error[0] == code_of(grpc.StatusCode.UNAVAILABLE)
    errors = error_events(events)
    assert [e.will_retry for e in errors] == [True, False]
    assert errors[0].attempt == 1
    assert events[-1].event_type == "error" and events[-1].terminal
    assert [e.terminal for e in events].count(True) == 1


async def test_unexpected_exception_is_internal_and_the_lane_keeps_serving(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    async def work(ctx: JobContext) -> None:
        calls[label(ctx)] += 1
        if label(ctx) == "bug":
            raise RuntimeError("boom")

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work), concurrency=1)
        await queue.start()
        bug = await queue.submit(SEGMENT, req("bug"))
        ok = await queue.submit(SEGMENT, req("ok"))
        failed, events = await wait_done(queue, bug.name)
        succeeded, _ = await wait_done(queue, ok.name)
        # The single lane is still there for later jobs too.
        later = await queue.submit(SEGMENT, req("later"))
        after, _ = await wait_done(queue, later.name)

    assert failed.state == JobState.FAILED
    assert failed.error is not None and failed.error[0] == code_of(grpc.StatusCode.INTERNAL)
    (error,) = error_events(events)
    assert error.kind == "internal"
    assert error.error_class == jobs_pb2.ERROR_CLASS_PERMANENT
    assert not error.will_retry
    assert "RuntimeError" in error.description and "boom" in error.description
    assert events[-1].terminal
    assert succeeded.state == JobState.SUCCEEDED
    assert after.state == JobState.SUCCEEDED
    assert calls == Counter({"bug": 1, "ok": 1, "later": 1})  # a bug is never retried


def test_a_job_failure_never_shows_a_server_path() -> None:
    from server.jobs.engine.failures import JobFailure

    failure = JobFailure.permanent(
        "internal",
        "FileNotFoundError: [Errno 2] No such file or directory: '/srv/framewise/processed/ab12/work/frames.png'; "
        "D-ID said https://api.d-id.com/talks/tlk_1 at 1/2 of HTTP/1.1",
    )
    assert "/srv" not in failure.description and "'.../frames.png'" in failure.description
    assert "https://api.d-id.com/talks/tlk_1" in failure.description and "1/2 of HTTP/1.1" in failure.description
    assert "/srv" not in str(failure)


async def test_a_full_disk_is_a_resource_failure_for_the_operator(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    async def work(ctx: JobContext) -> None:
        calls[label(ctx)] += 1
        (ctx.workdir / "partial.bin").write_bytes(b"x" * 10)
        if label(ctx) == "full":
            raise OSError(errno.ENOSPC, "No space left on device", str(ctx.workdir / "frames.png"))
        if label(ctx) == "missing":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(ctx.workdir / "gone.bin"))

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work), concurrency=1)
        await queue.start()
        full = await queue.submit(SEGMENT, req("full"))
        missing = await queue.submit(SEGMENT, req("missing"))
        full_op, full_events = await wait_done(queue, full.name)
        missing_op, missing_events = await wait_done(queue, missing.name)

    assert full_op.state == JobState.FAILED
    assert full_op.error is not None and full_op.error[0] == code_of(grpc.StatusCode.RESOURCE_EXHAUSTED)
    (error,) = error_events(full_events)
    assert error.error_class == jobs_pb2.ERROR_CLASS_RESOURCE and error.kind == "disk_full" and not error.will_retry
    assert "out of disk space" in error.description and "frames.png" in error.description
    # The client learns which file, never where the server keeps it.
    assert str(tmp_path) not in error.description and str(tmp_path) not in full_op.error[1]
    assert not env.workdir(full.name).exists()  # its intermediate files are rolled back
    # Any other OSError is still a bug, reported as internal, without the server's path either.
    (other,) = error_events(missing_events)
    assert other.kind == "internal" and missing_op.error[0] == code_of(grpc.StatusCode.INTERNAL)
    assert "gone.bin" in other.description and str(tmp_path) not in other.description
    assert calls == Counter({"full": 1, "missing": 1})


# ---------------------------------------------------------------------- cancellation


async def test_cancel_queued_job(tmp_path: Path) -> None:
    ran: list[str] = []
    started, gate = asyncio.Event(), asyncio.Event()

    async def work(ctx: JobContext) -> None:
        ran.append(label(ctx))
        started.set()
        await gate.wait()

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work), concurrency=1)
        await queue.start()
        a = await queue.submit(SEGMENT, req("a"))
        await wait(started, "job a to start")
        b = await queue.submit(SEGMENT, req("b"))
        assert await queue.queue_position(b.name) == 0

        cancelled = await asyncio.wait_for(queue.cancel(b.name), TIMEOUT_S)
        assert cancelled.state == JobState.CANCELLED and cancelled.done
        assert cancelled.stage == jobs_pb2.JOB_STAGE_CANCELLED
        assert cancelled.error is not None and cancelled.error[0] == code_of(grpc.StatusCode.CANCELLED)
        assert await queue.queue_position(b.name) == -1
        events = await env.store.events_after(b.name)
        assert [e.event_type for e in events] == ["stage_update", "complete"]
        assert events[-1].terminal
        assert decode(events[-1]).state == jobs_pb2.JOB_STATE_CANCELLED
        assert not env.workdir(b.name).exists()

        gate.set()
        final, _ = await wait_done(queue, a.name)
        assert final.state == JobState.SUCCEEDED
        assert ran == ["a"]  # b's stage never ran
        assert (await env.store.get_operation(b.name)).state == JobState.CANCELLED


async def test_cancel_running_job_releases_its_slot(tmp_path: Path) -> None:
    arrived: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    entered: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    release: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    interrupted: list[str] = []

    async def work(ctx: JobContext) -> None:
        (ctx.workdir / "partial.bin").write_bytes(b"x")
        arrived[label(ctx)].set()
        async with ctx.slot("detection"):
            entered[label(ctx)].set()
            try:
                await release[label(ctx)].wait()
            except asyncio.CancelledError:
                interrupted.append(label(ctx))
                raise

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work), slots={"detection": 1}, concurrency=2)
        await queue.start()
        a = await queue.submit(SEGMENT, req("a"))
        await wait(entered["a"], "job a to take the slot")
        b = await queue.submit(SEGMENT, req("b"))
        await wait(arrived["b"], "job b to wait for the slot")
        assert not entered["b"].is_set()
        assert queue.admission.in_use("detection") == 1

        cancelled = await asyncio.wait_for(queue.cancel(a.name), TIMEOUT_S)
        assert cancelled.state == JobState.CANCELLED
        assert cancelled.stage == jobs_pb2.JOB_STAGE_CANCELLED
        assert interrupted == ["a"]
        assert not env.workdir(a.name).exists()
        events = await env.store.events_after(a.name)
        assert events[-1].event_type == "complete" and events[-1].terminal
        assert decode(events[-1]).state == jobs_pb2.JOB_STATE_CANCELLED
        assert not error_events(events)

        # The freed slot goes to b.
        await wait(entered["b"], "job b to take the freed slot")
        assert queue.admission.in_use("detection") == 1
        release["b"].set()
        final, _ = await wait_done(queue, b.name)
        assert final.state == JobState.SUCCEEDED
        assert queue.admission.in_use("detection") == 0
        assert interrupted == ["a"]


async def test_cancel_finished_job_is_a_no_op(tmp_path: Path) -> None:
    async def work(ctx: JobContext) -> None:
        return None

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, work))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        done, _ = await wait_done(queue, op.name)
        again = await asyncio.wait_for(queue.cancel(op.name), TIMEOUT_S)

    assert done.state == JobState.SUCCEEDED
    assert again.state == JobState.SUCCEEDED
    assert again.last_sequence == done.last_sequence  # no event added
    assert not again.cancel_requested
    assert again.error is None and again.response == done.response


class _HoldingStore(SqliteJobStore):
    """Holds the job task's first read of its operation (the first thing JobExecutor._run does),
    so a cancel can land while the job has been taken from the queue but has not yet set up."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._holding = True

    async def get_operation(self, name: str):
        task = asyncio.current_task()
        # The executor names each job's task "job <operation name>".
        if self._holding and task is not None and task.get_name() == f"job {name}":
            self._holding = False
            self.held.set()
            await self.release.wait()
        return await super().get_operation(name)


async def test_cancel_just_after_a_lane_takes_the_job(tmp_path: Path) -> None:
    ran: list[str] = []

    async def work(ctx: JobContext) -> None:
        ran.append(label(ctx))

    async with environment(tmp_path, _HoldingStore(tmp_path / "jobs.db")) as env:
        store = env.store
        assert isinstance(store, _HoldingStore)
        queue = env.queue(Stage(DECODING, work), concurrency=1)
        await queue.start()
        a = await queue.submit(SEGMENT, req("a"))
        await wait(store.held, "the job task to read its operation")
        assert await queue.queue_position(a.name) == -1  # taken by the lane, not yet set up

        cancelled = await asyncio.wait_for(queue.cancel(a.name), TIMEOUT_S)
        assert cancelled.state == JobState.CANCELLED
        events = await store.events_after(a.name)
        assert events[-1].event_type == "complete" and decode(events[-1]).state == jobs_pb2.JOB_STATE_CANCELLED
        assert ran == []

        b = await queue.submit(SEGMENT, req("b"))
        final, _ = await wait_done(queue, b.name)
        assert final.state == JobState.SUCCEEDED
        assert ran == ["b"]


# ---------------------------------------------------------------------- shutdown and resume


class _HookedStorage(StorageManager):
    """Calls ``on_release`` from ``release()``, the last thing JobExecutor._run does (in its
    finally), i.e. in the very step that ends the job's task."""

    on_release: Callable[[], None] | None = None

    def release(self, directory: Path) -> None:
        super().release(directory)
        if self.on_release is not None:
            self.on_release()


async def test_stop_as_a_job_finishes_stops_the_lanes(tmp_path: Path) -> None:
    async def work(ctx: JobContext) -> None:
        return None

    async with environment(tmp_path) as env:
        storage = env.storage = _HookedStorage(env.storage.config)
        queue = env.queue(Stage(DECODING, work), concurrency=1)
        released = asyncio.Event()
        stops: list[asyncio.Task[None]] = []

        def stop_now() -> None:
            # stop() starts before the lane has seen its job's task end.
            stops.append(asyncio.get_running_loop().create_task(queue.stop()))
            released.set()

        storage.on_release = stop_now
        await queue.start()
        lanes = list(queue._tasks)
        op = await queue.submit(SEGMENT, req("a"))
        await wait(released, "the job to end")
        (stop,) = stops
        try:
            done, _ = await asyncio.wait({stop}, timeout=TIMEOUT_S)
            assert stop in done, "stop() hung: the lane swallowed its own cancellation"
        finally:
            stop.cancel()
        assert all(w.done() for w in lanes)
        assert (await env.store.get_operation(op.name)).state == JobState.SUCCEEDED


async def test_a_completing_event_stores_the_checkpoint_in_its_own_commit(tmp_path: Path) -> None:
    """A stage whose last act is its completion event (completes=True) is checkpointed with that event: cut
    off right after it (here: hangs, then shutdown), the restarted queue does not run it, or emit it, again."""
    calls: Counter[int] = Counter()
    completed = asyncio.Event()

    async def decode_video(ctx: JobContext) -> None:
        calls[DECODING] += 1
        await ctx.save_state(frames=42)
        await ctx.stage(DECODING, 10.0, "decoded", completes=True)
        if calls[DECODING] == 1:
            completed.set()
            await asyncio.Event().wait()  # the window between the event and the executor's own checkpoint

    async def track(ctx: JobContext) -> None:
        calls[TRACKING] += 1
        await ctx.stage(TRACKING, 50.0, "tracking")  # not completing: the executor checkpoints after it returns

    stages = (Stage(DECODING, decode_video), Stage(TRACKING, track))
    async with environment(tmp_path) as env:
        first = env.queue(*stages)
        await first.start()
        op = await first.submit(SEGMENT, req("a"))
        await wait(completed, "the completing event")
        assert (await env.store.get_operation(op.name)).last_completed_stage == DECODING
        await first.stop()
        second = env.queue(*stages)
        await second.start()
        final, events = await wait_done(second, op.name)

    assert final.state == JobState.SUCCEEDED and final.last_completed_stage == TRACKING
    assert calls == Counter({DECODING: 1, TRACKING: 1})
    decoded = [e for e in events if e.event_type == "stage_update" and decode(e).stage == DECODING]
    assert len(decoded) == 1  # the history holds it once


async def test_resume_after_restart_skips_completed_stages(tmp_path: Path) -> None:
    calls: Counter[int] = Counter()
    state_seen: list[dict] = []
    in_tracking = asyncio.Event()

    async def decode_video(ctx: JobContext) -> None:
        calls[DECODING] += 1
        await ctx.stage(DECODING, 10.0, "decoding")
        await ctx.save_state(frames=42)

    async def track(ctx: JobContext) -> None:
        calls[TRACKING] += 1
        await ctx.stage(TRACKING, 50.0, "tracking")
        state_seen.append(dict(ctx.state))
        if calls[TRACKING] == 1:
            in_tracking.set()
            await asyncio.Event().wait()  # cut off by the shutdown

    async def write(ctx: JobContext) -> None:
        calls[WRITING] += 1
        await ctx.stage(WRITING, 90.0, "writing")

    stages = (Stage(DECODING, decode_video), Stage(TRACKING, track), Stage(WRITING, write))
    async with environment(tmp_path) as env:
        first = env.queue(*stages)
        await first.start()
        op = await first.submit(SEGMENT, req("a"))
        await wait(in_tracking, "stage 2 to start")
        await first.stop()

        stopped = await env.store.get_operation(op.name)
        assert stopped.state == JobState.RUNNING  # shutdown is not cancellation
        assert stopped.last_completed_stage == DECODING
        assert stopped.stage == TRACKING
        assert not stopped.cancel_requested
        workdir = env.workdir(op.name)
        assert (workdir / "state.json").exists()
        assert not (workdir / KEEP_MARKER).exists()  # released on shutdown

        second = env.queue(*stages)
        assert second.bus is not first.bus
        await second.start()
        final, events = await wait_done(second, op.name)

    assert final.state == JobState.SUCCEEDED
    assert calls == Counter({DECODING: 1, TRACKING: 2, WRITING: 1})  # stage 1 not run again
    assert state_seen == [{"frames": 42}, {"frames": 42}]  # stage 1's state survives the restart
    assert jobs_pb2.SegmentVideoResponse.FromString(final.response or b"").frames_processed == 42
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert final.last_sequence == len(events)
    assert [(e.event_type, getattr(decode(e), "stage", None)) for e in events[:-1]] == [
        ("stage_update", jobs_pb2.JOB_STAGE_INITIALIZED),
        ("stage_update", DECODING),
        ("stage_update", TRACKING),  # queue 1, cut off
        ("stage_update", TRACKING),  # queue 2, resumed
        ("stage_update", WRITING),
        ("stage_update", jobs_pb2.JOB_STAGE_COMPLETED),
    ]
    assert events[-1].event_type == "complete" and events[-1].terminal


# ---------------------------------------------------------------------- events and the operation row


async def test_stage_events_drive_the_operation_row(tmp_path: Path) -> None:
    reached: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    go: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def decode_video(ctx: JobContext) -> None:
        await ctx.stage(DECODING, 10.0, "decoding video")
        reached["stage"].set()
        await go["stage"].wait()
        await ctx.progress(40.0, "frame 4/10", done=4, total=10)
        reached["progress"].set()
        await go["progress"].wait()
        await ctx.save_state(frames=10)

    async def write(ctx: JobContext) -> None:
        await ctx.stage(WRITING, 90.0, "writing artifacts")
        src = ctx.workdir / "frames.json"
        src.write_text("[]")
        await ctx.add_artifact(
            src, name="frames.json", kind=jobs_pb2.ARTIFACT_KIND_FRAMES_JSON, media_type="application/json"
        )

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, decode_video), Stage(WRITING, write))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        watcher = asyncio.create_task(wait_done(queue, op.name))  # a live watcher from the start

        await wait(reached["stage"], "the stage event")
        row = await env.store.get_operation(op.name)
        last = (await env.store.events_after(op.name))[-1]
        assert last.event_type == "stage_update" and row.last_sequence == last.sequence
        update = decode(last)
        assert (row.state, row.stage, row.percent, row.message) == (JobState.RUNNING, DECODING, 10.0, "decoding video")
        assert (update.stage, update.percent, update.message) == (row.stage, row.percent, row.message)
        assert row.start_time is not None and row.end_time is None
        go["stage"].set()

        await wait(reached["progress"], "the progress event")
        row = await env.store.get_operation(op.name)
        last = (await env.store.events_after(op.name))[-1]
        assert last.event_type == "progress_update" and row.last_sequence == last.sequence
        progress = decode(last)
        assert (progress.stage, progress.percent, progress.message, progress.done, progress.total) == (
            DECODING, 40.0, "frame 4/10", 4, 10,
        )  # fmt: skip
        assert (row.stage, row.percent, row.message) == (DECODING, 40.0, "frame 4/10")
        go["progress"].set()

        final, live = await asyncio.wait_for(watcher, TIMEOUT_S)
        stored = await env.store.events_after(op.name)
        artifact_path = env.storage.root / "videos" / op.name.rsplit("/", 1)[-1] / "frames.json"
        assert artifact_path.read_text() == "[]"
        assert not env.workdir(op.name).exists()  # intermediate files go, the artifact stays

    assert [(e.sequence, e.event_type, e.payload) for e in live] == [
        (e.sequence, e.event_type, e.payload) for e in stored
    ]
    assert [e.event_type for e in stored] == [
        "stage_update", "stage_update", "progress_update", "stage_update", "stage_update", "complete",
    ]  # fmt: skip
    assert [e.terminal for e in stored] == [False] * 5 + [True]
    completed, complete = decode(stored[-2]), decode(stored[-1])
    assert (completed.stage, completed.percent) == (jobs_pb2.JOB_STAGE_COMPLETED, 100.0)
    assert complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert [(a.name, a.size_bytes, a.media_type) for a in complete.artifacts] == [
        ("frames.json", 2, "application/json")
    ]
    assert complete.artifacts[0].kind == jobs_pb2.ARTIFACT_KIND_FRAMES_JSON
    assert len(complete.artifacts[0].sha256) == 64
    assert final.state == JobState.SUCCEEDED
    assert (final.stage, final.percent, final.message) == (jobs_pb2.JOB_STAGE_COMPLETED, 100.0, "completed")
    assert final.response == jobs_pb2.SegmentVideoResponse(frames_processed=10).SerializeToString()
    assert final.last_sequence == stored[-1].sequence
    assert final.last_completed_stage == WRITING
    assert final.error is None and final.end_time is not None


# ---------------------------------------------------------------------- durability of a stage's files


class _CheckpointTrace(SqliteJobStore):
    """Records, in ``trace``, each stored checkpoint (from a completing event or the executor's own update)."""

    def __init__(self, path: Path, trace: list[tuple[str, object]]) -> None:
        super().__init__(path)
        self.trace = trace

    async def update_operation(self, name: str, update: OperationUpdate | None = None, /, **fields: object) -> OperationRecord:
        checkpoint = fields.get("last_completed_stage", getattr(update, "last_completed_stage", None))
        record = await super().update_operation(name, update, **fields)
        if checkpoint is not None:
            self.trace.append(("checkpoint", checkpoint))
        return record

    async def append_event(self, name: str, event_type: str, payload: bytes, **kwargs: object) -> EventRecord:
        record = await super().append_event(name, event_type, payload, **kwargs)  # type: ignore[arg-type]
        update = kwargs.get("update")
        if update is not None and update.last_completed_stage is not None:  # type: ignore[attr-defined]
            self.trace.append(("checkpoint", update.last_completed_stage))  # type: ignore[attr-defined]
        return record


async def test_a_stage_s_files_reach_the_disk_before_its_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Power loss, not only kill -9: the working folder (the renames that put a stage's files in place) is
    fsynced before the checkpoint that lets a resumed job skip the stage, whether the stage ends with a
    completing event or the executor stores the checkpoint after it."""
    trace: list[tuple[str, object]] = []
    real_fsync = os.fsync

    def traced_fsync(fd: int) -> None:
        trace.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", traced_fsync)

    async def decode_video(ctx: JobContext) -> None:
        await asyncio.to_thread(write_atomically, ctx.workdir / "frames.bin", b"x" * 1000)
        await ctx.stage(DECODING, 10.0, "decoded", completes=True)

    async def track(ctx: JobContext) -> None:
        await asyncio.to_thread(write_atomically, ctx.workdir / "tracks.bin", b"y" * 1000)

    async with environment(tmp_path, _CheckpointTrace(tmp_path / "jobs.db", trace)) as env:
        queue = env.queue(Stage(DECODING, decode_video), Stage(TRACKING, track))
        await queue.start()
        op = await queue.submit(SEGMENT, req("a"))
        final, _ = await wait_done(queue, op.name)
        workdir = env.workdir(op.name)
    assert final.state == JobState.SUCCEEDED

    for stage, written in ((DECODING, "frames.bin"), (TRACKING, "tracks.bin")):
        checkpoint = ("checkpoint", stage)
        assert checkpoint in trace, trace
        before = trace[: trace.index(checkpoint)]
        # The data, in the writer's own temporary file, before its rename.
        written_at = next((i for i, (kind, path) in enumerate(before)
                           if kind == "fsync" and path.parent == workdir and path.name.startswith(f".{written}.")
                           and path.name.endswith(".tmp")), None)
        assert written_at is not None, trace
        # The folder, after the file's rename and before the checkpoint.
        assert ("fsync", workdir) in before[written_at:], trace
    # The job's folders, made when it started, with its first checkpoint.
    first = trace[: trace.index(("checkpoint", DECODING))]
    assert ("fsync", workdir.parent) in first and ("fsync", workdir.parent.parent) in first
