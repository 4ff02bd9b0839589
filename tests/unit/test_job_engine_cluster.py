"""The job engine with several replicas on one shared store: JobQueues with distinct replica ids,
each with its own PostgresJobStore connection pool and EventBus, on one real PostgreSQL (the
session's server, a fresh schema per test) and one storage root, as replicas in separate
processes would be. Claiming in creation order with leases, takeover of an expired lease and
fencing of the old holder, cross-replica cancel, and one-per-cluster retention.

The stages are small async functions of the test (tests/unit/test_job_engine.py's FakePipeline); what
runs where is told by the EventBus the job reports through (each engine has its own)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs import EventBus, JobState, OperationUpdate
from server.jobs.engine.admission import Admission
from server.jobs.engine.context import JobContext
from server.jobs.engine.definition import Stage
from server.jobs.engine.queue import JobQueue, QueueFull
from server.jobs.engine.retention import OperationRetention
from server.jobs.files.storage import StorageConfig, StorageManager
from server.jobs.store import EventRecord, utcnow
from server.jobs.store.postgres import PostgresJobStore
from server.pg.local import LocalPostgres
from tests.conftest import drop_postgres_schema, fresh_postgres_schema
from tests.unit.test_job_engine import FAST_RETRY, SEGMENT, FakePipeline, decode, label, req

DECODING = jobs_pb2.JOB_STAGE_DECODING
TRACKING = jobs_pb2.JOB_STAGE_TRACKING
TIMEOUT_S = 30.0


@pytest.fixture
async def schema_url(postgres_server: LocalPostgres) -> AsyncIterator[str]:
    url, schema = await fresh_postgres_schema(postgres_server)
    yield url
    await drop_postgres_schema(postgres_server, schema)


class Cluster:
    """Engines ("replicas") sharing one PostgreSQL schema and one storage root."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.queues: list[JobQueue] = []
        self.stores: list[PostgresJobStore] = []

    async def engine(
        self, replica: str, *stages: Stage, concurrency: int = 1, lease_s: float = 10.0, max_queued: int = 1000
    ) -> JobQueue:
        store = await PostgresJobStore(self.url).open()
        self.stores.append(store)
        queue = JobQueue(
            EventBus(store),
            StorageManager(StorageConfig(root=self.root)),
            Admission({"detection": 2}),
            {SEGMENT: FakePipeline(list(stages))},
            concurrency=concurrency,
            max_queued=max_queued,
            retry=FAST_RETRY,
            rng=random.Random(0),
            replica_id=replica,
            lease_s=lease_s,
            poll_s=0.2,
            store_retry_s=0.2,
        )
        self.queues.append(queue)
        return queue

    async def close(self) -> None:
        for queue in self.queues:
            await asyncio.wait_for(queue.stop(), TIMEOUT_S)
        for store in self.stores:
            await store.close()


@pytest.fixture
async def cluster(schema_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(schema_url, tmp_path / "storage")
    try:
        yield c
    finally:
        await c.close()


async def until(predicate: Callable[[], object], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Polls an async predicate (the store is the truth, whichever replica wrote it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():  # type: ignore[misc]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def assert_clean_history(events: list[EventRecord]) -> None:
    """Sequences 1..n without gap or duplicate, and exactly one terminal event, the last."""
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.terminal for e in events].count(True) == 1 and events[-1].terminal


async def test_three_replicas_racing_for_60_queued_jobs_run_each_exactly_once(cluster: Cluster) -> None:
    runs: list[tuple[str, int]] = []

    async def work(ctx: JobContext) -> None:
        runs.append((ctx.name, id(ctx.bus)))
        await asyncio.sleep(0.01)  # long enough for the other replicas' lanes to claim meanwhile

    engines = [await cluster.engine(f"replica-{i}", Stage(DECODING, work), concurrency=2) for i in range(3)]
    names = [(await engines[i % 3].submit(SEGMENT, req(f"job-{i}"))).name for i in range(60)]
    await asyncio.gather(*(e.start() for e in engines))
    store = cluster.stores[0]

    async def all_done() -> bool:
        ops, _ = await store.list_operations(states=JobState.SUCCEEDED, page_size=100)
        return len(ops) == 60

    await until(all_done, "60 jobs to succeed")
    assert Counter(name for name, _ in runs) == Counter(names)  # each ran exactly once
    buses = {id(e.bus): e.replica_id for e in engines}
    ran_on = Counter(buses[bus] for _, bus in runs)
    assert len(ran_on) >= 2, f"one replica ran everything: {ran_on}"
    for name in names:
        op = await store.get_operation(name)
        assert op.lease_owner in buses.values() and op.lease_epoch == 1
        events = await store.events_after(name)
        assert_clean_history(events)
        assert [e.event_type for e in events].count("complete") == 1


async def test_an_expired_lease_is_taken_over_and_the_frozen_holder_can_no_longer_write(cluster: Cluster) -> None:
    decoded: list[str] = []
    a_in_tracking, a_wakes, a_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    refused: list[BaseException] = []

    async def decode_stage(ctx: JobContext) -> None:
        decoded.append(ctx.operation.lease_owner or "")
        await ctx.save_state(frames=7)
        await ctx.stage(DECODING, 40.0, "decoded", completes=True)

    async def track_stage(ctx: JobContext) -> None:
        if ctx.bus is a.bus:
            a_in_tracking.set()
            await a_wakes.wait()  # A is frozen here while B takes the job over
            try:
                # (Its working folder may be gone by now: B finished and removed it. A progress
                # event touches no file, so what refuses it is the store's fence.)
                await ctx.progress(95.0, "tracked on A after waking up")
            except BaseException as exc:
                refused.append(exc)
                raise
            finally:
                a_done.set()
        await ctx.stage(TRACKING, 90.0, f"tracked on B, frames {ctx.state['frames']}", completes=True)

    stages = (Stage(DECODING, decode_stage), Stage(TRACKING, track_stage))
    a = await cluster.engine("replica-a", *stages, lease_s=1.5)
    b = await cluster.engine("replica-b", *stages, lease_s=1.5)
    await a.start()
    op = await a.submit(SEGMENT, req("x"))
    await asyncio.wait_for(a_in_tracking.wait(), TIMEOUT_S)

    # A freezes: its renewals stop reaching the store (a SIGSTOPped process renews nothing).
    never = asyncio.Event()

    async def frozen_renewal(*args: object, **kwargs: object) -> None:
        await never.wait()

    a.store.renew_lease = frozen_renewal  # type: ignore[method-assign]
    await b.start()

    async def succeeded() -> bool:
        return (await b.store.get_operation(op.name)).state == JobState.SUCCEEDED

    await until(succeeded, "replica B to take the job over and finish it")
    final = await b.store.get_operation(op.name)
    assert final.lease_owner == "replica-b" and final.lease_epoch == 2
    assert decoded == ["replica-a"]  # B resumed after the completed stage, it did not decode again

    # A wakes up and reports its stage: refused, and nothing of it is stored.
    a_wakes.set()
    await asyncio.wait_for(a_done.wait(), TIMEOUT_S)
    assert [type(e).__name__ for e in refused] == ["LeaseLostError"]
    await until(lambda: _true_when(not a.running), "replica A to drop the job")
    events = await b.store.events_after(op.name)
    assert_clean_history(events)
    messages = [decode(e).message for e in events if e.event_type in ("stage_update", "progress_update")]
    assert "tracked on A after waking up" not in messages
    assert messages.count("decoded") == 1 and messages.count("tracked on B, frames 7") == 1
    assert (await b.store.get_operation(op.name)).state == JobState.SUCCEEDED


async def _true_when(value: bool) -> bool:
    return value


async def test_cancel_through_another_replica_reaches_the_job_where_it_runs(cluster: Cluster) -> None:
    started, interrupted = asyncio.Event(), asyncio.Event()

    async def work(ctx: JobContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # runs until cancelled
        except asyncio.CancelledError:
            interrupted.set()
            raise

    a = await cluster.engine("replica-a", Stage(DECODING, work), lease_s=1.5)
    b = await cluster.engine("replica-b", Stage(DECODING, work), lease_s=1.5)
    await a.start()
    await b.start()
    op = await b.submit(SEGMENT, req("x"))
    await asyncio.wait_for(started.wait(), TIMEOUT_S)
    holder, other = (a, b) if a.running == [op.name] else (b, a)
    assert holder.running == [op.name] and other.running == []

    # Through the replica that does not run it: the holder learns of it (notification, or its
    # next renewal at the latest) and stops the job; the call returns with the final state.
    answer = await asyncio.wait_for(other.cancel(op.name), 10.0)
    assert answer.state == JobState.CANCELLED
    assert interrupted.is_set()
    events = await other.store.events_after(op.name)
    assert_clean_history(events)
    assert decode(events[-1]).state == jobs_pb2.JOB_STATE_CANCELLED
    await until(lambda: _true_when(not holder.running), "the holder to drop the job")

    # A queued job nobody holds is cancelled in the store at once, by any replica.
    await a.stop()
    await b.stop()
    queued = await a.submit(SEGMENT, req("y"))
    assert (await b.cancel(queued.name)).state == JobState.CANCELLED


async def test_retention_runs_on_one_replica_and_moves_when_it_is_gone(schema_url: str) -> None:
    stores = [await PostgresJobStore(schema_url).open() for _ in range(2)]
    try:
        names = []
        for i in range(4):
            op, _ = await stores[0].create_operation(kind=SEGMENT, request=b"r")
            await stores[0].append_event(
                op.name, "complete", b"", update=OperationUpdate(state=JobState.SUCCEEDED)
            )
            names.append(op.name)
        retentions = [OperationRetention(s, retention_s=60.0, interval_s=3600.0) for s in stores]
        later = utcnow() + timedelta(hours=1)
        results = await asyncio.gather(*(r.run_once(later) for r in retentions))
        assert sorted(results, key=lambda n: -1 if n is None else n) == [None, 4]
        for name in names:
            with pytest.raises(KeyError):
                await stores[1].get_operation(name)
        holder = results.index(4)
        # The holder keeps the duty; the other replica gets it once the holder is gone.
        assert await retentions[holder].run_once(later) == 0
        assert await retentions[1 - holder].run_once(later) is None
        await stores[holder].close()
        assert await retentions[1 - holder].run_once(later) == 0
    finally:
        for s in stores:
            with contextlib.suppress(Exception):
                await s.close()


async def test_the_store_going_down_pauses_the_engine_and_the_job_resumes_when_it_is_back(tmp_path: Path) -> None:
    """PostgreSQL stopped under a running job: the job stops where it is without writing, the
    lanes pause, and once the server is back the job resumes after its last checkpoint by
    itself: nothing committed lost, nothing duplicated."""
    runs: Counter[str] = Counter()
    in_tracking, store_down = asyncio.Event(), asyncio.Event()

    async def decode_stage(ctx: JobContext) -> None:
        runs["decode"] += 1
        await ctx.stage(DECODING, 40.0, "decoded", completes=True)

    async def track_stage(ctx: JobContext) -> None:
        runs["track"] += 1
        in_tracking.set()
        await store_down.wait()
        await ctx.stage(TRACKING, 90.0, f"tracked (run {runs['track']})", completes=True)

    async with LocalPostgres() as server:
        c = Cluster(server.url, tmp_path / "storage")
        try:
            a = await c.engine("replica-a", Stage(DECODING, decode_stage), Stage(TRACKING, track_stage), lease_s=3.0)
            await a.start()
            op = await a.submit(SEGMENT, req("x"))
            await asyncio.wait_for(in_tracking.wait(), TIMEOUT_S)
            await server.stop()
            store_down.set()  # the stage now reports: the store is unreachable
            await until(lambda: _true_when(not a.running), "the job to stop while the store is down")
            assert a.store.unavailable_reason is not None
            await server.start()  # same folder, same port

            async def succeeded() -> bool:
                try:
                    return (await a.store.get_operation(op.name)).state == JobState.SUCCEEDED
                except Exception:  # noqa: BLE001 - still reconnecting
                    return False

            await until(succeeded, "the job to resume and finish once the store is back")
            assert runs == Counter({"decode": 1, "track": 2})  # resumed after its checkpoint
            events = await a.store.events_after(op.name)
            assert_clean_history(events)
            messages = [decode(e).message for e in events if e.event_type == "stage_update"]
            assert messages.count("decoded") == 1 and "tracked (run 1)" not in messages
            assert messages.count("tracked (run 2)") == 1
        finally:
            await c.close()


async def test_a_draining_replica_hands_its_jobs_back_at_once(cluster: Cluster) -> None:
    """SIGTERM drain: the stopped jobs' leases go back, so another replica resumes them now, not
    after a long lease expired."""
    on_a = asyncio.Event()
    ran_on: list[str] = []

    async def work(ctx: JobContext) -> None:
        ran_on.append(ctx.operation.lease_owner or "")
        if ctx.bus is a.bus:
            on_a.set()
            await asyncio.Event().wait()  # until A drains

    a = await cluster.engine("replica-a", Stage(DECODING, work), lease_s=60.0)
    b = await cluster.engine("replica-b", Stage(DECODING, work), lease_s=60.0)
    await a.start()
    op = await a.submit(SEGMENT, req("x"))
    await asyncio.wait_for(on_a.wait(), TIMEOUT_S)
    await b.start()
    await a.stop()  # what SIGTERM does to the engine

    async def succeeded() -> bool:
        return (await b.store.get_operation(op.name)).state == JobState.SUCCEEDED

    await until(succeeded, "replica B to resume the handed-back job", timeout_s=10.0)  # far under the 60 s lease
    assert ran_on == ["replica-a", "replica-b"]
    assert_clean_history(await b.store.events_after(op.name))


async def test_the_queue_bound_holds_across_replicas(cluster: Cluster) -> None:
    """--max-queued-jobs counts what waits in the whole cluster, not per replica."""
    idle = Stage(DECODING, lambda ctx: asyncio.sleep(0))
    a = await cluster.engine("replica-a", idle, max_queued=3)
    b = await cluster.engine("replica-b", idle, max_queued=3)  # neither started: jobs stay queued
    first = await a.submit(SEGMENT, req("1"))
    await b.submit(SEGMENT, req("2"))
    third = await a.submit(SEGMENT, req("3"), request_id="third")
    for queue in (a, b):
        with pytest.raises(QueueFull):
            await queue.submit(SEGMENT, req("4"))
    # A retry of a submission that exists is answered with it, full or not.
    assert (await b.submit(SEGMENT, req("3"), request_id="third")).name == third.name
    assert await b.queue_position(first.name) == 0 and await a.queue_position(third.name) == 2
    assert await a.store.count_waiting() == 3
