"""JobStore.listen: the wake-ups every replica sharing a store receives (work queued, cancel
requested, lease released, event committed, re-read after a reconnect), on both backends:
SQLite in process, PostgreSQL through LISTEN/NOTIFY between two stores (two replicas' pools
and LISTEN connections) on a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.store import JobState, JobStore, LeaseLostError, OperationUpdate
from server.jobs.store.notifications import (
    EVENTS_CHANNEL,
    JOBS_CHANNEL,
    Notification,
    NotificationKind,
    parse_notification,
)
from server.jobs.store.postgres import PostgresJobStore
from server.jobs.store.sqlite import SqliteJobStore
from tests.conftest import drop_postgres_schema, fresh_postgres_schema

SEGMENT = jobs_pb2.JOB_KIND_SEGMENT_VIDEO
WAIT_S = 10.0


class Inbox:
    """A listener that records notifications and lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[Notification] = []
        self._changed = asyncio.Event()

    def __call__(self, notification: Notification) -> None:
        self.items.append(notification)
        self._changed.set()

    async def wait_for(self, wanted: Notification) -> None:
        async with asyncio.timeout(WAIT_S):
            while wanted not in self.items:
                self._changed.clear()
                await self._changed.wait()

    def of(self, operation: str) -> list[Notification]:
        return [n for n in self.items if n.operation == operation]


@pytest.fixture(params=["sqlite", "postgres"])
async def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server
) -> AsyncIterator[tuple[JobStore, JobStore]]:  # noqa: ANN001
    """(writer, listener): on PostgreSQL two stores on one database (two replicas); on SQLite
    the same store twice (one replica: notifications never leave the process)."""
    if request.param == "sqlite":
        store = await SqliteJobStore(tmp_path / "jobs.db").open()
        yield store, store
        await store.close()
        return
    url, schema = await fresh_postgres_schema(postgres_server)
    a = await PostgresJobStore(url).open()
    b = await PostgresJobStore(url).open()
    yield a, b
    await a.close()
    await b.close()
    await drop_postgres_schema(postgres_server, schema)


async def listening(store: JobStore) -> Inbox:
    inbox = Inbox()
    store.listen(inbox)
    if isinstance(store, PostgresJobStore):
        assert store.listener is not None
        await asyncio.wait_for(store.listener.connected.wait(), WAIT_S)
        await inbox.wait_for(Notification(NotificationKind.RESYNC))
    return inbox


async def test_queued_cancel_and_released_reach_the_other_replica(two_stores: tuple[JobStore, JobStore]) -> None:
    writer, other = two_stores
    inbox = await listening(other)
    op, _ = await writer.create_operation(kind=SEGMENT, request=b"r")
    await inbox.wait_for(Notification(NotificationKind.QUEUED, op.name))
    claimed = await writer.claim_next("replica-a", 30)
    assert claimed is not None and claimed.name == op.name
    await writer.release_lease(op.name, "replica-a", claimed.lease_epoch)
    await inbox.wait_for(Notification(NotificationKind.RELEASED, op.name))
    await writer.request_cancel(op.name)
    await inbox.wait_for(Notification(NotificationKind.CANCEL, op.name))
    # Only writes that changed something announce it: a second cancel request, and a release by
    # a replica that no longer holds the lease, send nothing.
    await writer.request_cancel(op.name)
    await writer.release_lease(op.name, "replica-a", claimed.lease_epoch)
    marker, _ = await writer.create_operation(kind=SEGMENT, request=b"r")
    await inbox.wait_for(Notification(NotificationKind.QUEUED, marker.name))  # everything before it arrived
    kinds = [n.kind for n in inbox.of(op.name)]
    assert kinds == [NotificationKind.QUEUED, NotificationKind.RELEASED, NotificationKind.CANCEL]


async def test_an_unsubscribed_listener_hears_nothing_more(two_stores: tuple[JobStore, JobStore]) -> None:
    writer, other = two_stores
    kept = await listening(other)
    dropped = Inbox()
    remove = other.listen(dropped)
    remove()
    op, _ = await writer.create_operation(kind=SEGMENT, request=b"r")
    await kept.wait_for(Notification(NotificationKind.QUEUED, op.name))
    assert dropped.of(op.name) == []


async def test_events_are_announced_after_commit_in_order(postgres_server) -> None:  # noqa: ANN001
    url, schema = await fresh_postgres_schema(postgres_server)
    try:
        async with PostgresJobStore(url) as writer, PostgresJobStore(url) as other:
            inbox = await listening(other)
            op, _ = await writer.create_operation(kind=SEGMENT, request=b"r")
            for i in range(5):
                await writer.append_event(op.name, "progress_update", b"%d" % i)
            await writer.append_event(
                op.name, "complete", b"", update=OperationUpdate(state=JobState.SUCCEEDED)
            )
            await inbox.wait_for(Notification(NotificationKind.EVENT, op.name, 6))
            events = [n for n in inbox.of(op.name) if n.kind == NotificationKind.EVENT]
            assert [n.sequence for n in events] == [1, 2, 3, 4, 5, 6]
            # A refused write (fencing) takes no sequence and announces nothing.
            op2, _ = await writer.create_operation(kind=SEGMENT, request=b"r")
            await inbox.wait_for(Notification(NotificationKind.QUEUED, op2.name))
            with pytest.raises(LeaseLostError):
                await writer.append_event(op2.name, "progress_update", b"x", epoch=7)
            await writer.append_event(op2.name, "progress_update", b"y")
            await inbox.wait_for(Notification(NotificationKind.EVENT, op2.name, 1))
            assert [n.sequence for n in inbox.of(op2.name) if n.kind == NotificationKind.EVENT] == [1]
    finally:
        await drop_postgres_schema(postgres_server, schema)


async def test_a_rolled_back_write_announces_nothing(postgres_server) -> None:  # noqa: ANN001
    """Notifications are transactional: one sent inside a transaction that rolls back never
    arrives (the store relies on this to announce only committed events)."""
    url, schema = await fresh_postgres_schema(postgres_server)
    try:
        async with PostgresJobStore(url) as other:
            inbox = await listening(other)
            async with await psycopg.AsyncConnection.connect(url) as conn:
                await conn.execute("SELECT pg_notify(%s, 'operations/rolled-back:1')", (EVENTS_CHANNEL,))
                await conn.rollback()
                await conn.execute("SELECT pg_notify(%s, 'operations/committed:1')", (EVENTS_CHANNEL,))
                await conn.commit()
            await inbox.wait_for(Notification(NotificationKind.EVENT, "operations/committed", 1))
            assert inbox.of("operations/rolled-back") == []
    finally:
        await drop_postgres_schema(postgres_server, schema)


async def test_the_listen_connection_comes_back_with_a_resync(postgres_server) -> None:  # noqa: ANN001
    """The LISTEN session killed under the store: it reconnects by itself and says RESYNC
    (what was sent while it was gone must be re-read), then hears notifications again."""
    url, schema = await fresh_postgres_schema(postgres_server)
    try:
        async with PostgresJobStore(url) as writer, PostgresJobStore(url) as other:
            inbox = await listening(other)
            assert other.listener is not None and other.listener.connections == 1
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
                await admin.execute("SELECT pg_terminate_backend(%s)", (other.listener.backend_pid,))
            async with asyncio.timeout(WAIT_S):
                while other.listener.connections < 2:
                    await asyncio.sleep(0.05)
            assert [n.kind for n in inbox.items].count(NotificationKind.RESYNC) == 2
            op, _ = await writer.create_operation(kind=SEGMENT, request=b"r")
            await inbox.wait_for(Notification(NotificationKind.QUEUED, op.name))
    finally:
        await drop_postgres_schema(postgres_server, schema)


def test_payloads_parse_and_unknown_ones_are_ignored() -> None:
    assert parse_notification(EVENTS_CHANNEL, "operations/ab:12") == Notification(
        NotificationKind.EVENT, "operations/ab", 12
    )
    assert parse_notification(JOBS_CHANNEL, "cancel:operations/ab") == Notification(
        NotificationKind.CANCEL, "operations/ab"
    )
    for channel, payload in (
        (EVENTS_CHANNEL, "operations/ab:x"),
        (EVENTS_CHANNEL, "12"),
        (JOBS_CHANNEL, "rebalance:operations/ab"),
        (JOBS_CHANNEL, "queued:"),
        ("other", "queued:operations/ab"),
    ):
        assert parse_notification(channel, payload) is None
