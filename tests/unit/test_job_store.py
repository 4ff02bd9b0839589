"""The SQLite job store's own behaviour (WAL, file migrations, kill -9) and the event fan-out to
watchers. What every backend must do is tests/unit/test_job_store_contract.py. No Triton needed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs import (
    EventBus,
    EventRecord,
    Heartbeat,
    JobState,
    JobStore,
    JobStoreError,
    OperationNotFoundError,
    OperationUpdate,
    SqliteJobStore,
)
from server.jobs.store.sqlite import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[2]
SEGMENT = jobs_pb2.JOB_KIND_SEGMENT_VIDEO
TALKING = jobs_pb2.JOB_KIND_TALKING_VIDEO


@pytest.fixture
async def store(tmp_path: Path):
    s = SqliteJobStore(tmp_path / "jobs.db")
    await s.open()
    yield s
    await s.close()


async def new_op(store: SqliteJobStore, **kw) -> str:
    op, created = await store.create_operation(kind=kw.pop("kind", SEGMENT), request=b"req", **kw)
    assert created
    return op.name


def complete_payload() -> bytes:
    return jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_SUCCEEDED).SerializeToString()


def real_sequences(items: list) -> list[int]:
    return [i.sequence for i in items if isinstance(i, EventRecord)]


# -- store ----------------------------------------------------------------------------------------


async def test_protocol_and_schema(store: SqliteJobStore, tmp_path: Path) -> None:
    assert isinstance(store, JobStore)
    # Every migration applied: 1-5 operations, leases, replicas, handed-off sessions; then tenancy,
    # API keys and quotas (their order in the lists is the order they landed in).
    assert await store.schema_version() == SCHEMA_VERSION >= 8
    conn = sqlite3.connect(tmp_path / "jobs.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"schema_version", "operations", "operation_requests", "events", "artifacts", "replicas", "tracking_sessions"} <= tables
        columns = {r[1] for r in conn.execute("PRAGMA table_info(operations)")}
        assert {"lease_owner", "lease_epoch", "lease_expire_us"} <= columns
        # Claiming reads the unfinished operations through an index, not every operation.
        plan = " ".join(
            str(r[3])
            for r in conn.execute(
                "EXPLAIN QUERY PLAN SELECT name FROM operations WHERE state IN (1, 2) "
                "AND (lease_expire_us IS NULL OR lease_expire_us <= 0) ORDER BY create_us, name LIMIT 1"
            )
        )
        assert "USING INDEX operations_by_state (state=?)" in plan and "SCAN operations" not in plan, plan
    finally:
        conn.close()


async def test_reopen_keeps_the_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "jobs.db"
    async with SqliteJobStore(path) as s:
        await s.create_operation(kind=SEGMENT, request=b"r")
    async with SqliteJobStore(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        assert len((await s.list_operations())[0]) == 1


async def test_an_unfinished_operation_without_its_request_is_an_error(store: SqliteJobStore, tmp_path: Path) -> None:
    # b"" would parse as a valid default request and run a job nobody asked for.
    op, _ = await store.create_operation(kind=TALKING, request=b"photo+audio")
    conn = sqlite3.connect(tmp_path / "jobs.db")
    conn.execute("DELETE FROM operation_requests WHERE name = ?", (op.name,))
    conn.commit()
    conn.close()
    with pytest.raises(JobStoreError, match="request is not stored"):
        await store.get_request(op.name)


async def test_an_event_does_not_rewrite_the_request(store: SqliteJobStore, tmp_path: Path) -> None:
    # A talking video's request carries its photo and audio. Kept in the operations row, every
    # stage event rewrote it (the stage message changes the row's size): 400 KB written and fsynced
    # per event for a 200 KB photo. Each event now writes a few pages, whatever the request's size.
    op, _ = await store.create_operation(kind=TALKING, request=os.urandom(200_000))
    wal = tmp_path / "jobs.db-wal"
    written = []
    for i, message in enumerate(["Running person detection", "Person found", "Removing the background", "x"]):
        before = wal.stat().st_size
        payload = jobs_pb2.StageUpdate(stage=jobs_pb2.JOB_STAGE_DETECTION_RUNNING, message=message).SerializeToString()
        update = OperationUpdate(state=JobState.RUNNING, percent=25.0 + i, message=message)
        await store.append_event(op.name, "stage_update", payload, update=update)
        written.append(wal.stat().st_size - before)
    assert max(written) < 40_000, written  # 4 KB pages: the event, the operation row, the indexes
    assert len(await store.get_request(op.name)) == 200_000


_V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
CREATE TABLE operations (
    name TEXT PRIMARY KEY, kind INTEGER NOT NULL, state INTEGER NOT NULL, stage INTEGER NOT NULL DEFAULT 0,
    percent REAL NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '', request BLOB NOT NULL, response BLOB,
    error_code INTEGER, error_message TEXT, create_us INTEGER NOT NULL, update_us INTEGER NOT NULL, start_us INTEGER,
    end_us INTEGER, last_sequence INTEGER NOT NULL DEFAULT 0, last_completed_stage INTEGER NOT NULL DEFAULT 0,
    request_id TEXT UNIQUE, cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX operations_by_create ON operations (create_us, name);
CREATE INDEX operations_by_state ON operations (state, create_us, name);
CREATE TABLE events (
    operation TEXT NOT NULL REFERENCES operations (name) ON DELETE CASCADE, sequence INTEGER NOT NULL,
    time_us INTEGER NOT NULL, event_type TEXT NOT NULL, terminal INTEGER NOT NULL DEFAULT 0, payload BLOB NOT NULL,
    PRIMARY KEY (operation, sequence)
) WITHOUT ROWID;
CREATE TABLE artifacts (
    operation TEXT NOT NULL REFERENCES operations (name) ON DELETE CASCADE, name TEXT NOT NULL,
    kind INTEGER NOT NULL, media_type TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, expire_us INTEGER, PRIMARY KEY (operation, name)
) WITHOUT ROWID;
INSERT INTO operations (name, kind, state, message, request, create_us, update_us, last_sequence, request_id)
    VALUES ('operations/running', 2, 2, 'Detecting', x'0102', 1, 2, 1, 'idem'),
           ('operations/done', 1, 3, 'Done', x'09', 1, 3, 1, NULL);
INSERT INTO events VALUES ('operations/running', 1, 2, 'stage_update', 0, x'08'),
                          ('operations/done', 1, 3, 'complete', 1, x'08');
"""


async def test_a_version_1_store_is_migrated(tmp_path: Path) -> None:
    # A store written by the previous release (the request inside the operations row) opens with
    # every operation and event, the running job's request moved out and the finished one's gone.
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.close()
    async with SqliteJobStore(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        running = await s.get_operation("operations/running")
        assert running.state == JobState.RUNNING and running.message == "Detecting" and running.last_sequence == 1
        assert running.request_id == "idem" and await s.get_request("operations/running") == b"\x01\x02"
        assert await s.get_request("operations/done") == b""
        assert [e.sequence for e in await s.events_after("operations/running")] == [1]
        assert (await s.append_event("operations/running", "progress_update", b"2")).sequence == 2
        # Version 3: the job a previous release left RUNNING has no lease, so a claimer takes it.
        assert running.lease_owner is None and running.lease_epoch == 0
        claimed = await s.claim_next("replica-a", 30)
        assert claimed is not None and claimed.name == "operations/running" and claimed.lease_epoch == 1
        assert await s.claim_next("replica-a", 30) is None  # the finished one never


_CHILD = """
import asyncio, sys
from server.jobs.store.sqlite import SqliteJobStore

async def main():
    store = SqliteJobStore(sys.argv[1], synchronous=sys.argv[3])
    name = sys.argv[2]
    while True:
        ev = await store.append_event(name, "progress_update", b"x" * 200)
        print(ev.sequence, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_durable_across_sigkill(tmp_path: Path, synchronous: str) -> None:
    """Both modes the server offers (--job-store-sync) keep every published event across kill -9:
    NORMAL's WAL bytes are in the page cache, which outlives the process (not a power cut)."""
    path = tmp_path / "kill.db"
    async with SqliteJobStore(path) as s:
        name = await new_op(s)
        await s.update_operation(name, state=JobState.RUNNING)

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        str(path),
        name,
        synchronous,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    printed: list[int] = []
    try:
        assert child.stdout is not None and child.stderr is not None
        async with asyncio.timeout(60):
            while len(printed) < 150:
                line = await child.stdout.readline()
                if not line:
                    err = (await child.stderr.read()).decode()[-2000:]
                    pytest.fail(f"child ended early: {err}")
                printed.append(int(line))
            child.send_signal(signal.SIGKILL)  # mid-stream: it is appending as fast as it can
            rest = await child.stdout.read()
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL
    # Only complete lines were printed after a commit.
    printed += [int(x) for x in rest.decode().split("\n")[:-1] if x]
    assert printed == list(range(1, len(printed) + 1))

    async with SqliteJobStore(path) as s:
        op = await s.get_operation(name)
        events = await s.events_after(name, 0, limit=100_000)
        seqs = [e.sequence for e in events]
        assert seqs == list(range(1, len(seqs) + 1))  # contiguous from 1
        assert set(printed) <= set(seqs)  # nothing published is lost
        assert op.last_sequence == seqs[-1]
        assert [o.name for o in await s.unfinished_operations()] == [name]
        # The store goes on from there.
        assert (await s.append_event(name, "progress_update", b"")).sequence == seqs[-1] + 1


# -- event bus ------------------------------------------------------------------------------------


async def collect(sub, timeout: float = 10.0) -> list:
    items = []
    async with asyncio.timeout(timeout):
        async for item in sub:
            items.append(item)
    return items


async def test_late_subscriber_gets_history_then_live_once(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5)
    name = await new_op(store)
    for i in range(5):
        await bus.emit(name, "progress_update", b"%d" % i)
    sub = bus.subscribe(name)
    task = asyncio.create_task(collect(sub))
    await asyncio.sleep(0.05)
    for i in range(5):
        await bus.emit(name, "progress_update", b"%d" % (i + 5))
    await bus.emit(name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
    items = await task
    assert real_sequences(items) == list(range(1, 12))
    assert items[-1].event_type == "complete" and items[-1].terminal
    assert [i.payload for i in items[:10]] == [b"%d" % i for i in range(10)]
    assert bus.subscriber_count() == 0  # unregistered at the end


async def test_many_subscribers_each_get_every_event_in_order(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5)
    name = await new_op(store)
    subs = [bus.subscribe(name) for _ in range(100)]
    tasks = [asyncio.create_task(collect(s)) for s in subs]
    for i in range(50):
        await bus.emit(name, "progress_update", b"")
        if i % 7 == 0:
            await asyncio.sleep(0)
    await bus.emit(name, "complete", complete_payload())
    results = await asyncio.gather(*tasks)
    for items in results:
        assert real_sequences(items) == list(range(1, 52))
        assert all(isinstance(i, EventRecord) for i in items)
    assert bus.subscriber_count(name) == 0


async def test_after_sequence_starts_after_k(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5)
    name = await new_op(store)
    for _ in range(10):
        await bus.emit(name, "progress_update", b"")
    await bus.emit(name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
    assert real_sequences(await collect(bus.subscribe(name, after_sequence=4))) == list(range(5, 12))
    assert real_sequences(await collect(bus.subscribe(name, after_sequence=10))) == [11]
    # Finished and nothing left after the cursor: the stream ends at once.
    assert await collect(bus.subscribe(name, after_sequence=11), timeout=2) == []
    with pytest.raises(OperationNotFoundError):
        await collect(bus.subscribe("operations/unknown"))
    with pytest.raises(ValueError):
        bus.subscribe(name, after_sequence=-1)


async def test_subscribe_while_publishing_never_gaps_or_duplicates(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5, replay_batch=7)
    name = await new_op(store)
    total = 300

    async def producer(k: int) -> None:
        # Several concurrent producers: publication order may differ from commit order.
        for i in range(total // 3):
            await bus.emit(name, "progress_update", b"%d" % k)
            if i % 3 == k:
                await asyncio.sleep(0)

    producers = [asyncio.create_task(producer(k)) for k in range(3)]
    watchers = []
    for i in range(60):
        after = (i * 5) % 40 if i % 2 else 0
        watchers.append((after, asyncio.create_task(collect(bus.subscribe(name, after)))))
        await asyncio.sleep(0 if i % 3 else 0.001)
    await asyncio.gather(*producers)
    await bus.emit(name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
    for after, task in watchers:
        items = await task
        assert real_sequences(items) == list(range(after + 1, total + 2)), after


async def test_heartbeats_when_idle_carry_last_sequence(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=0.05)
    name = await new_op(store)
    await bus.emit(name, "progress_update", b"")
    await bus.emit(name, "progress_update", b"")
    items: list = []

    async def watch() -> None:
        async for item in bus.subscribe(name):
            items.append(item)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    beats = [i for i in items if isinstance(i, Heartbeat)]
    assert real_sequences(items) == [1, 2]
    assert len(beats) >= 2
    assert all(b.sequence == 2 and b.operation == name and b.event_type == "heartbeat" for b in beats)
    await bus.emit(name, "progress_update", b"")
    await asyncio.sleep(0.15)
    assert isinstance(items[-1], Heartbeat) and items[-1].sequence == 3
    await bus.emit(name, "error", b"", terminal=True, update=OperationUpdate(state=JobState.FAILED))
    await asyncio.wait_for(task, 2)
    assert real_sequences(items) == [1, 2, 3, 4]
    assert items[-1].event_type == "error"  # the iterator ended after the terminal event


async def test_no_heartbeat_while_events_keep_coming(store: SqliteJobStore) -> None:
    """The heartbeat is due heartbeat_s after the last item delivered: a watcher whose events come
    more often than that gets none, and gets one once the events stop."""
    bus = EventBus(store, heartbeat_s=0.2)
    name = await new_op(store)
    items: list = []

    async def watch() -> None:
        async for item in bus.subscribe(name):
            items.append(item)

    task = asyncio.create_task(watch())
    for _ in range(12):  # 0.6 s of events, 0.05 s apart: three heartbeat periods
        await bus.emit(name, "progress_update", b"")
        await asyncio.sleep(0.05)
    assert not [i for i in items if isinstance(i, Heartbeat)]
    await asyncio.sleep(0.35)
    beats = [i for i in items if isinstance(i, Heartbeat)]
    assert len(beats) == 1 and beats[0].sequence == 12
    await bus.emit(name, "complete", b"", terminal=True, update=OperationUpdate(state=JobState.SUCCEEDED))
    await asyncio.wait_for(task, 2)
    assert real_sequences(items) == list(range(1, 14))


async def test_non_final_error_does_not_end_the_stream(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5)
    name = await new_op(store)
    task = asyncio.create_task(collect(bus.subscribe(name)))
    await bus.emit(name, "error", b"retrying")  # will_retry: not terminal
    await bus.emit(name, "progress_update", b"")
    await asyncio.sleep(0.05)
    assert not task.done()
    await bus.emit(name, "complete", complete_payload())
    assert real_sequences(await task) == [1, 2, 3]


async def test_slow_subscriber_does_not_block_publish(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5, queue_size=4, replay_batch=16)
    name = await new_op(store)
    slow = bus.subscribe(name)
    fast_task = asyncio.create_task(collect(bus.subscribe(name)))
    # The slow watcher is live (history replayed, waiting) before the burst starts.
    first_task = asyncio.create_task(anext(slow))
    await asyncio.sleep(0.05)
    assert not first_task.done()
    records = [await store.append_event(name, "progress_update", b"") for _ in range(200)]
    started = time.perf_counter()
    for r in records:
        await bus.publish(r)  # the slow watcher reads nothing meanwhile
    assert time.perf_counter() - started < 0.5
    assert len(slow._sub.pending) <= 4  # memory stays bounded
    assert slow._sub.overflowed  # its queue overflowed: it will re-read the store
    first = await first_task
    assert first.sequence == 1
    for _ in range(20):
        await bus.emit(name, "progress_update", b"")
    await bus.emit(name, "complete", complete_payload())
    rest = await collect(slow)
    assert [first.sequence] + real_sequences(rest) == list(range(1, 222))
    assert real_sequences(await fast_task) == list(range(1, 222))


async def test_closing_a_subscription_unregisters_it(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5)
    name = await new_op(store)
    await bus.emit(name, "progress_update", b"")
    async with bus.subscribe(name) as sub:
        assert bus.subscriber_count(name) == 1
        assert (await anext(sub)).sequence == 1
    assert bus.subscriber_count(name) == 0
    never_iterated = bus.subscribe(name)
    assert bus.subscriber_count(name) == 1
    await never_iterated.aclose()
    assert bus.subscriber_count(name) == 0
    # bus.close() ends live watchers.
    task = asyncio.create_task(collect(bus.subscribe(name)))
    await asyncio.sleep(0.05)
    bus.close()
    assert real_sequences(await asyncio.wait_for(task, 2)) == [1]


async def test_out_of_order_publication_is_filled_from_the_store(store: SqliteJobStore) -> None:
    bus = EventBus(store, heartbeat_s=5)
    name = await new_op(store)
    task = asyncio.create_task(collect(bus.subscribe(name)))
    await asyncio.sleep(0.05)
    e1 = await store.append_event(name, "progress_update", b"1")
    e2 = await store.append_event(name, "progress_update", b"2")
    e3 = await store.append_event(name, "complete", complete_payload())
    for r in (e3, e1, e2):  # committed 1,2,3; published 3,1,2
        await bus.publish(r)
    items = await task
    assert real_sequences(items) == [1, 2, 3] and [i.payload for i in items[:2]] == [b"1", b"2"]
