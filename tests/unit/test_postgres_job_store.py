"""The PostgreSQL job store's own behaviour, on a real server: versioned migrations under an
advisory lock, SKIP LOCKED claiming, and the server going away and coming back. What every
backend must do is tests/unit/test_job_store_contract.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.store import JobState, JobStoreError, JobStoreUnavailableError, OperationUpdate
from server.jobs.store.postgres import PostgresJobStore
from server.jobs.store.postgres_schema import MIGRATIONS, SCHEMA_VERSION
from server.pg.local import LocalPostgres, free_port
from tests.conftest import drop_postgres_schema, fresh_postgres_schema

SEGMENT = jobs_pb2.JOB_KIND_SEGMENT_VIDEO


@pytest.fixture
async def schema_url(postgres_server: LocalPostgres) -> AsyncIterator[str]:
    url, schema = await fresh_postgres_schema(postgres_server)
    yield url
    await drop_postgres_schema(postgres_server, schema)


async def test_replicas_starting_together_migrate_once(schema_url: str) -> None:
    # Five replicas open an empty database at the same moment: without the advisory lock two of
    # them would both CREATE TABLE operations and one would fail.
    stores = [PostgresJobStore(schema_url) for _ in range(5)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert [await s.schema_version() for s in stores] == [SCHEMA_VERSION] * 5
        async with await psycopg.AsyncConnection.connect(schema_url) as conn:
            rows = await (
                await conn.execute("SELECT version, description FROM schema_migrations ORDER BY version")
            ).fetchall()
        assert rows == [(i + 1, m.description) for i, m in enumerate(MIGRATIONS)]
        op, _ = await stores[0].create_operation(kind=SEGMENT, request=b"r")
        assert (await stores[4].get_operation(op.name)).name == op.name
    finally:
        for s in stores:
            await s.close()
    # Opening again applies nothing.
    async with PostgresJobStore(schema_url) as again:
        assert await again.schema_version() == SCHEMA_VERSION
        assert len((await again.list_operations())[0]) == 1


async def test_a_newer_schema_is_refused(schema_url: str) -> None:
    async with PostgresJobStore(schema_url) as s:
        await s.create_operation(kind=SEGMENT, request=b"r")
    async with await psycopg.AsyncConnection.connect(schema_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO schema_migrations (version, description) VALUES (99, 'from the future')")
    with pytest.raises(RuntimeError, match="schema version 99, newer than this code's"):
        await PostgresJobStore(schema_url).open()


async def test_an_unfinished_operation_without_its_request_is_an_error(schema_url: str) -> None:
    # b"" would parse as a valid default request and run a job nobody asked for.
    async with PostgresJobStore(schema_url) as s:
        op, _ = await s.create_operation(kind=SEGMENT, request=b"video")
        async with await psycopg.AsyncConnection.connect(schema_url, autocommit=True) as conn:
            await conn.execute("DELETE FROM operation_requests WHERE name = %s", (op.name,))
        with pytest.raises(JobStoreError, match="request is not stored"):
            await s.get_request(op.name)


async def test_a_claimer_skips_a_row_another_transaction_holds(schema_url: str) -> None:
    """SKIP LOCKED: a claim never queues behind another claimer's (or writer's) row lock; it takes
    the next operation at once."""
    async with PostgresJobStore(schema_url) as s:
        first = (await s.create_operation(kind=SEGMENT, request=b"1"))[0].name
        second = (await s.create_operation(kind=SEGMENT, request=b"2"))[0].name
        async with await psycopg.AsyncConnection.connect(schema_url) as holder:
            # An open transaction holding the oldest operation's row, as a claim in flight would.
            await holder.execute("SELECT 1 FROM operations WHERE name = %s FOR UPDATE", (first,))
            started = time.monotonic()
            got = await asyncio.wait_for(s.claim_next("replica-a", 30), 5)
            assert got is not None and got.name == second and time.monotonic() - started < 2
            assert await asyncio.wait_for(s.claim_next("replica-a", 30), 5) is None
            await holder.rollback()
        got = await s.claim_next("replica-a", 30)
        assert got is not None and got.name == first


async def test_a_large_request_stays_out_of_the_event_path(schema_url: str) -> None:
    # The request table's own row (TOASTed out of line): an event's UPDATE of the operation row
    # does not copy it, and a finished operation drops it.
    async with PostgresJobStore(schema_url) as s:
        photo = bytes(range(256)) * 4096  # 1 MiB
        op, _ = await s.create_operation(kind=SEGMENT, request=photo)
        for i in range(3):
            await s.append_event(
                op.name, "stage_update", b"s", update=OperationUpdate(state=JobState.RUNNING, percent=i)
            )
        assert await s.get_request(op.name) == photo
        async with await psycopg.AsyncConnection.connect(schema_url) as conn:
            row_size = await (await conn.execute(
                "SELECT pg_column_size(o.*) FROM operations o WHERE name = %s", (op.name,)
            )).fetchone()  # fmt: skip
        assert row_size is not None and row_size[0] < 2000


async def test_the_server_going_away_is_unavailable_and_the_store_recovers() -> None:
    """PostgreSQL stopped under an open store: calls fail fast with JobStoreUnavailableError
    (gRPC: UNAVAILABLE), nothing committed is lost, and the same store object works again once
    the server is back, without being reopened."""
    async with LocalPostgres() as server:
        store = await PostgresJobStore(server.url, max_connections=4, acquire_timeout_s=3).open()
        try:
            op, _ = await store.create_operation(kind=SEGMENT, request=b"r")
            await store.append_event(op.name, "progress_update", b"1")
            await server.stop()
            for call in (
                lambda: store.get_operation(op.name),
                lambda: store.append_event(op.name, "progress_update", b"lost"),
                lambda: store.claim_next("replica-a", 30),
            ):
                started = time.monotonic()
                with pytest.raises(JobStoreUnavailableError):
                    await call()
                # Fast: not a wait for a pooled connection that cannot come.
                assert time.monotonic() - started < 2
            assert store.unavailable_reason is not None and "refused" in store.unavailable_reason
            await server.start()  # same folder, same port
            deadline = time.monotonic() + 20
            while True:
                try:
                    back = await store.get_operation(op.name)
                    break
                except JobStoreUnavailableError:
                    assert time.monotonic() < deadline, "the store did not recover"
                    await asyncio.sleep(0.2)
            assert store.unavailable_reason is None
            assert back.last_sequence == 1  # the refused append left nothing
            assert (await store.append_event(op.name, "progress_update", b"2")).sequence == 2
            assert [e.payload for e in await store.events_after(op.name)] == [b"1", b"2"]
        finally:
            await store.close()


async def test_closing_while_the_server_is_down() -> None:
    async with LocalPostgres() as server:
        store = await PostgresJobStore(server.url).open()
        await server.stop()
        with pytest.raises(JobStoreUnavailableError):
            await store.get_operation("operations/x")
        await asyncio.wait_for(store.close(), 5)  # the recovery task stops with it


async def test_unreachable_at_open_is_unavailable() -> None:
    started = time.monotonic()
    with pytest.raises(JobStoreUnavailableError, match="could not connect"):
        await PostgresJobStore(
            f"postgresql://nobody:x@127.0.0.1:{free_port()}/none", connect_timeout_s=2, acquire_timeout_s=1
        ).open()
    assert time.monotonic() - started < 15
