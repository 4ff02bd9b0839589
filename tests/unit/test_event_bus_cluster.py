"""The EventBus across replicas: two EventBus objects on two PostgresJobStore objects (two
replicas' pools and LISTEN connections) on a real PostgreSQL. Events emitted through one bus
reach the other bus's watchers through the store (committed, then NOTIFY, then read by
sequence): every event exactly once, in order, resumable anywhere, nothing read while idle, and
nothing lost or duplicated across a lost LISTEN connection or a PostgreSQL restart. The
single-replica behaviour of the bus is tests/unit/test_job_store.py's "event bus" part."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.engine.events import EventBus, Heartbeat, Subscription
from server.jobs.store import EventRecord, JobState, JobStoreUnavailableError, OperationUpdate
from server.jobs.store.postgres import PostgresJobStore
from server.pg.local import LocalPostgres
from tests.conftest import drop_postgres_schema, fresh_postgres_schema

SEGMENT = jobs_pb2.JOB_KIND_SEGMENT_VIDEO
WAIT_S = 20.0


def complete_payload() -> bytes:
    return jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_SUCCEEDED).SerializeToString()


class CountingReads:
    """Wraps a store's events_after to count the reads the bus makes."""

    def __init__(self, store: PostgresJobStore) -> None:
        self.count = 0
        inner: Callable[..., Awaitable[list[EventRecord]]] = store.events_after

        async def events_after(*args: Any, **kwargs: Any) -> list[EventRecord]:
            self.count += 1
            return await inner(*args, **kwargs)

        store.events_after = events_after  # type: ignore[method-assign]


async def collect(sub: Subscription, items: list | None = None) -> list:
    items = [] if items is None else items
    async with asyncio.timeout(WAIT_S):
        async for item in sub:
            items.append(item)
    return items


def sequences(items: list) -> list[int]:
    return [i.sequence for i in items if isinstance(i, EventRecord)]


async def listening(store: PostgresJobStore, bus: EventBus, name: str) -> Subscription:
    """A watcher on ``bus``, returned once the store's LISTEN connection is up."""
    sub = bus.subscribe(name)
    assert store.listener is not None
    await asyncio.wait_for(store.listener.connected.wait(), WAIT_S)
    return sub


@pytest.fixture
async def url(postgres_server: LocalPostgres) -> AsyncIterator[str]:
    url, schema = await fresh_postgres_schema(postgres_server)
    yield url
    await drop_postgres_schema(postgres_server, schema)


async def test_a_watcher_on_another_replica_gets_every_event_once_in_order(url: str) -> None:
    async with PostgresJobStore(url) as store_s, PostgresJobStore(url) as store_r:
        bus_s = EventBus(store_s, heartbeat_s=5)  # the replica running the job
        bus_r = EventBus(store_r, heartbeat_s=0.2)  # the replica the watchers are connected to
        reads = CountingReads(store_r)
        op, _ = await store_s.create_operation(kind=SEGMENT, request=b"r")
        name = op.name
        watchers = [await listening(store_r, bus_r, name) for _ in range(20)]
        streams = [[] for _ in watchers]
        tasks = [asyncio.create_task(collect(w, s)) for w, s in zip(watchers, streams, strict=True)]
        local = asyncio.create_task(collect(bus_s.subscribe(name)))

        # Idle: heartbeats, and not one read of the store (no polling).
        await asyncio.sleep(0.3)  # the watchers' own first reads and the RESYNC's are done
        reads_before_idle = reads.count
        await asyncio.sleep(1.0)
        assert reads.count == reads_before_idle
        assert all(any(isinstance(i, Heartbeat) for i in s) for s in streams)

        total = 90
        reads_before = reads.count

        async def producer(k: int) -> None:
            # Concurrent appenders: commit order is sequence order, publication order is not.
            for i in range(total // 3):
                await bus_s.emit(name, "progress_update", b"%d" % k)
                if i % 3 == k:
                    await asyncio.sleep(0)

        producers = [asyncio.create_task(producer(k)) for k in range(3)]
        # Watchers that join mid-stream with after_sequence (a client resuming).
        resumed: list[tuple[int, asyncio.Task[list]]] = []
        while len(resumed) < 5:
            await asyncio.sleep(0.01)
            last = (await store_s.get_operation(name)).last_sequence
            if last >= 10 * (len(resumed) + 1):
                after = last - 3
                resumed.append((after, asyncio.create_task(collect(bus_r.subscribe(name, after)))))
        await asyncio.gather(*producers)
        await bus_s.emit(name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
        expected = list(range(1, total + 2))
        for stream in await asyncio.gather(*tasks):
            assert sequences(stream) == expected
        for after, task in resumed:
            assert sequences(await task) == list(range(after + 1, total + 2)), after
        assert sequences(await local) == expected
        # One read per notification at most, shared by the 20 watchers (plus the resumed
        # watchers' own history reads), not one per watcher per event.
        assert reads.count - reads_before <= total + 1 + 2 * len(resumed)
        assert bus_r.subscriber_count() == 0


async def test_events_committed_while_the_listen_connection_is_gone_still_arrive(url: str) -> None:
    """The watching replica's LISTEN session is killed while events keep being committed: the
    notifications sent meanwhile are lost, the RESYNC on reconnect re-reads, nothing is missing
    and nothing is twice."""
    async with PostgresJobStore(url) as store_s, PostgresJobStore(url) as store_r:
        bus_s = EventBus(store_s, heartbeat_s=5)
        bus_r = EventBus(store_r, heartbeat_s=5)
        op, _ = await store_s.create_operation(kind=SEGMENT, request=b"r")
        watcher = await listening(store_r, bus_r, op.name)
        task = asyncio.create_task(collect(watcher))
        listener = store_r.listener
        assert listener is not None
        total = 60
        for i in range(total):
            await bus_s.emit(op.name, "progress_update", b"%d" % i)
            if i == 20:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
                    await admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            await asyncio.sleep(0.005)
        await bus_s.emit(op.name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
        items = await task
        assert listener.connections >= 2  # it did reconnect
        assert sequences(items) == list(range(1, total + 2))
        assert [i.payload for i in items[:total]] == [b"%d" % i for i in range(total)]


async def test_a_postgres_restart_mid_stream_loses_and_duplicates_nothing() -> None:
    async with LocalPostgres() as server:
        store_s = await PostgresJobStore(server.url, acquire_timeout_s=3).open()
        store_r = await PostgresJobStore(server.url, acquire_timeout_s=3).open()
        try:
            bus_s = EventBus(store_s, heartbeat_s=5)
            bus_r = EventBus(store_r, heartbeat_s=5)
            op, _ = await store_s.create_operation(kind=SEGMENT, request=b"r")
            watcher = await listening(store_r, bus_r, op.name)
            task = asyncio.create_task(collect(watcher))
            for i in range(10):
                await bus_s.emit(op.name, "progress_update", b"%d" % i)
            await server.stop()
            with pytest.raises(JobStoreUnavailableError):
                await bus_s.emit(op.name, "progress_update", b"refused")
            await server.start()  # same folder, same port
            sent = 10
            async with asyncio.timeout(WAIT_S):
                while sent < 20:
                    try:
                        await bus_s.emit(op.name, "progress_update", b"%d" % sent)
                    except JobStoreUnavailableError:
                        await asyncio.sleep(0.2)  # the writer's store is still reconnecting
                        continue
                    sent += 1
            await bus_s.emit(op.name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
            items = await task
            assert sequences(items) == list(range(1, 22))
            assert [i.payload for i in items[:20]] == [b"%d" % i for i in range(20)]
            assert store_r.listener is not None and store_r.listener.connections >= 2
        finally:
            await store_s.close()
            await store_r.close()
