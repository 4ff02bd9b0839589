"""The durable job store (SQLite) and the event fan-out to watchers. No Triton needed."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs import (
    ArtifactRecord,
    EventBus,
    EventRecord,
    Heartbeat,
    JobState,
    JobStore,
    JobStoreError,
    OperationNotFinishedError,
    OperationNotFoundError,
    OperationUpdate,
    RequestIdConflictError,
    SqliteJobStore,
)
from server.jobs.retention import OperationRetention

REPO = Path(__file__).resolve().parents[1]
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


def stage_payload(percent: float) -> bytes:
    return jobs_pb2.StageUpdate(stage=jobs_pb2.JOB_STAGE_TRACKING, percent=percent).SerializeToString()


def complete_payload() -> bytes:
    return jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_SUCCEEDED).SerializeToString()


def real_sequences(items: list) -> list[int]:
    return [i.sequence for i in items if isinstance(i, EventRecord)]


# -- store ----------------------------------------------------------------------------------------


def test_job_state_mirrors_proto() -> None:
    for state in JobState:
        assert jobs_pb2.JobState.Value(f"JOB_STATE_{state.name}") == state.value


async def test_protocol_and_schema(store: SqliteJobStore, tmp_path: Path) -> None:
    assert isinstance(store, JobStore)
    assert await store.schema_version() == 2
    conn = sqlite3.connect(tmp_path / "jobs.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"schema_version", "operations", "operation_requests", "events", "artifacts"} <= tables
    finally:
        conn.close()


async def test_create_get_and_update(store: SqliteJobStore) -> None:
    op, created = await store.create_operation(kind=TALKING, request=b"\x01\x02", message="queued")
    assert created and op.name.startswith("operations/")
    assert op.state == JobState.QUEUED and not op.done
    assert op.create_time.tzinfo is not None and op.create_time.utcoffset() == timedelta(0)
    assert op.start_time is None and op.end_time is None and op.last_sequence == 0
    got = await store.get_operation(op.name)
    assert got == op and await store.get_request(op.name) == b"\x01\x02"

    running = await store.update_operation(
        op.name, state=JobState.RUNNING, stage=jobs_pb2.JOB_STAGE_DETECTION_RUNNING, percent=10.0
    )
    assert running.state == JobState.RUNNING and running.start_time is not None
    assert running.stage == jobs_pb2.JOB_STAGE_DETECTION_RUNNING and running.percent == 10.0
    assert running.update_time >= op.update_time

    done = await store.update_operation(
        op.name,
        OperationUpdate(state=JobState.SUCCEEDED, response=b"resp", last_completed_stage=11, percent=100.0),
    )
    assert done.done and done.end_time is not None and done.start_time == running.start_time
    assert done.response == b"resp" and done.last_completed_stage == 11

    failed_op = await new_op(store)
    failed = await store.update_operation(failed_op, state=JobState.FAILED, error=(9, "no person"))
    assert failed.error == (9, "no person")

    with pytest.raises(OperationNotFoundError):
        await store.get_operation("operations/nope")
    with pytest.raises(OperationNotFoundError):
        await store.update_operation("operations/nope", percent=1.0)


async def test_idempotent_create_by_request_id(store: SqliteJobStore) -> None:
    first, created = await store.create_operation(kind=SEGMENT, request=b"a", request_id="r-1")
    again, created_again = await store.create_operation(kind=SEGMENT, request=b"a", request_id="r-1")
    assert created and not created_again and again == first
    # Concurrent duplicates still yield one operation.
    results = await asyncio.gather(
        *(store.create_operation(kind=SEGMENT, request=b"b", request_id="r-2") for _ in range(10))
    )
    assert len({op.name for op, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    # No request_id (or ""): every call creates.
    a, _ = await store.create_operation(kind=SEGMENT, request=b"c", request_id="")
    b, _ = await store.create_operation(kind=SEGMENT, request=b"c")
    assert a.name != b.name and a.request_id is None
    with pytest.raises(RequestIdConflictError):
        await store.create_operation(kind=TALKING, request=b"a", request_id="r-1")


async def test_list_paging_and_state_filter(store: SqliteJobStore) -> None:
    names = [await new_op(store) for _ in range(10)]
    for n in names[:4]:
        await store.update_operation(n, state=JobState.RUNNING)
    for n in names[4:6]:
        await store.update_operation(n, state=JobState.SUCCEEDED)

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        items, token = await store.list_operations(page_size=3, page_token=token)
        pages += 1
        seen += [o.name for o in items]
        assert len(items) <= 3
        if not token:
            break
    assert pages == 4 and seen == names  # stable (create_time, name) order, nothing repeated

    running, tok = await store.list_operations(states=JobState.RUNNING)
    assert [o.name for o in running] == names[:4] and tok == ""
    first, tok = await store.list_operations(states=(JobState.RUNNING, JobState.QUEUED), page_size=5)
    rest, tok2 = await store.list_operations(states=(JobState.RUNNING, JobState.QUEUED), page_size=5, page_token=tok)
    assert [o.name for o in first + rest] == names[:4] + names[6:] and tok2 == ""
    assert (await store.list_operations(kind=TALKING))[0] == []

    # A token survives deletion of the item it points after.
    items, tok = await store.list_operations(page_size=5)
    await store.delete_operation(names[4])  # SUCCEEDED, in the first page
    rest, _ = await store.list_operations(page_size=50, page_token=tok)
    assert [o.name for o in rest] == names[5:]

    unfinished = await store.unfinished_operations()
    assert [o.name for o in unfinished] == names[:4] + names[6:]
    with pytest.raises(ValueError):
        await store.list_operations(page_token="garbage!!")


async def test_append_assigns_contiguous_sequences_under_concurrency(store: SqliteJobStore) -> None:
    name = await new_op(store)
    other = await new_op(store)

    async def appender(i: int) -> list[int]:
        out = []
        for j in range(10):
            ev = await store.append_event(name, "progress_update", f"{i}:{j}".encode())
            out.append(ev.sequence)
            await store.append_event(other, "progress_update", b"x")
        return out

    results = await asyncio.gather(*(appender(i) for i in range(20)))
    all_seqs = sorted(s for r in results for s in r)
    assert all_seqs == list(range(1, 201))
    for r in results:
        assert r == sorted(r)
    stored = await store.events_after(name, 0, limit=1000)
    assert [e.sequence for e in stored] == list(range(1, 201))
    assert (await store.get_operation(name)).last_sequence == 200
    assert (await store.get_operation(other)).last_sequence == 200


async def test_two_connections_share_the_sequence(tmp_path: Path) -> None:
    """Two store objects (two connections, two threads) on one file: BEGIN IMMEDIATE keeps
    sequence assignment atomic."""
    path = tmp_path / "shared.db"
    a, b = SqliteJobStore(path), SqliteJobStore(path)
    try:
        name = await new_op(a)

        async def run(s: SqliteJobStore) -> list[int]:
            return [(await s.append_event(name, "progress_update", b"")).sequence for _ in range(50)]

        ra, rb = await asyncio.gather(run(a), run(b))
        assert sorted(ra + rb) == list(range(1, 101))
    finally:
        await a.close()
        await b.close()


async def test_events_after_resumes_exactly(store: SqliteJobStore) -> None:
    name = await new_op(store)
    for i in range(1, 11):
        ev = await store.append_event(name, "stage_update", stage_payload(i))
        assert ev.sequence == i and not ev.terminal
        assert ev.time.utcoffset() == timedelta(0)
    last = await store.append_event(
        name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED)
    )
    assert last.sequence == 11 and last.terminal
    op = await store.get_operation(name)
    assert op.last_sequence == 11 and op.state == JobState.SUCCEEDED and op.end_time is not None

    assert [e.sequence for e in await store.events_after(name, 4)] == list(range(5, 12))
    assert [e.sequence for e in await store.events_after(name, 4, limit=3)] == [5, 6, 7]
    assert await store.events_after(name, 11) == []
    assert await store.events_after("operations/unknown") == []
    ev = (await store.events_after(name, 6, limit=1))[0]
    assert ev.event_type == "stage_update"
    assert jobs_pb2.StageUpdate.FromString(ev.payload).percent == 7.0
    # Rebuilding the wire message from a record.
    resp = jobs_pb2.WatchOperationResponse(sequence=ev.sequence, name=ev.operation)
    getattr(resp, ev.event_type).MergeFromString(ev.payload)
    assert resp.WhichOneof("event") == "stage_update"

    final_error = await store.append_event(await new_op(store), "error", b"", terminal=True)
    assert final_error.terminal
    with pytest.raises(ValueError):
        await store.append_event(name, "heartbeat", b"")
    with pytest.raises(OperationNotFoundError):
        await store.append_event("operations/unknown", "progress_update", b"")


async def test_cancel_artifacts_and_delete_only_finished(store: SqliteJobStore) -> None:
    name = await new_op(store)
    await store.append_event(name, "progress_update", b"p")
    expire = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    art = ArtifactRecord(name, "overlay.mp4", 3, "video/mp4", "/data/a/overlay.mp4", 10, "ab", expire)
    await store.add_artifact(art)
    await store.add_artifact(ArtifactRecord(name, "frames.json", 4, "application/json", "/data/a/f.json", 5, "cd"))
    await store.add_artifact(
        ArtifactRecord(name, "overlay.mp4", 3, "video/mp4", "/data/a/overlay.mp4", 11, "ef", expire)
    )
    arts = await store.list_artifacts(name)
    assert [a.name for a in arts] == ["frames.json", "overlay.mp4"]
    assert arts[1].size == 11 and arts[1].expire_time == expire and arts[0].expire_time is None
    with pytest.raises(OperationNotFoundError):
        await store.add_artifact(ArtifactRecord("operations/x", "a", 1, "x", "/p", 1, "s"))

    cancelled = await store.request_cancel(name)
    assert cancelled.cancel_requested and cancelled.state == JobState.QUEUED

    with pytest.raises(OperationNotFinishedError):
        await store.delete_operation(name)
    await store.update_operation(name, state=JobState.RUNNING)
    with pytest.raises(OperationNotFinishedError):
        await store.delete_operation(name)
    await store.update_operation(name, state=JobState.CANCELLED)
    paths = await store.delete_operation(name)
    assert sorted(paths) == ["/data/a/f.json", "/data/a/overlay.mp4"]
    with pytest.raises(OperationNotFoundError):
        await store.get_operation(name)
    assert await store.events_after(name) == [] and await store.list_artifacts(name) == []
    with pytest.raises(OperationNotFoundError):
        await store.delete_operation(name)
    with pytest.raises(OperationNotFoundError):
        await store.request_cancel(name)


async def test_a_finished_operation_forgets_its_request(store: SqliteJobStore) -> None:
    # The request can carry an inline photo and audio (tens of MB): kept while the job may run (a resumed job
    # reads it), dropped with the terminal state.
    op, _ = await store.create_operation(kind=TALKING, request=b"photo+audio" * 1000)
    await store.update_operation(op.name, state=JobState.RUNNING)
    assert len(await store.get_request(op.name)) == 11000
    await store.append_event(op.name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
    done = await store.get_operation(op.name)
    assert done.state == JobState.SUCCEEDED and await store.get_request(op.name) == b"" and done.end_time is not None
    with pytest.raises(OperationNotFoundError):
        await store.get_request("operations/unknown")


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


async def test_operation_retention_deletes_what_finished_long_ago(store: SqliteJobStore, tmp_path: Path) -> None:
    old, recent, running = await new_op(store), await new_op(store), await new_op(store)
    artifact = tmp_path / "old.mp4"
    artifact.write_bytes(b"mp4")
    await store.add_artifact(ArtifactRecord(old, "talking_video.mp4", 6, "video/mp4", str(artifact), 3, "ab"))
    ended = datetime(2026, 1, 1, tzinfo=UTC)
    await store.update_operation(old, state=JobState.SUCCEEDED, end_time=ended)
    await store.update_operation(recent, state=JobState.FAILED, end_time=ended + timedelta(days=29))
    await store.update_operation(running, state=JobState.RUNNING)
    assert await store.finished_before(ended + timedelta(days=1)) == [old]

    retention = OperationRetention(store, retention_s=30 * 86400, interval_s=3600, batch=1)
    assert await retention.purge_once(now=ended + timedelta(days=30, seconds=1)) == 1
    with pytest.raises(OperationNotFoundError):
        await store.get_operation(old)
    assert not artifact.exists()  # its files go with it
    assert (await store.get_operation(recent)).state == JobState.FAILED  # 29 days: kept
    assert (await store.get_operation(running)).state == JobState.RUNNING  # never finished: never due
    assert await retention.purge_once(now=ended + timedelta(days=60)) == 1  # batches of 1: loops until done
    assert [op.name for op in (await store.list_operations())[0]] == [running]


async def test_reopen_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "jobs.db"
    async with SqliteJobStore(path) as s:
        op, _ = await s.create_operation(kind=SEGMENT, request=b"r", request_id="idem")
        await s.append_event(op.name, "progress_update", b"1")
    async with SqliteJobStore(path) as s:
        again, created = await s.create_operation(kind=SEGMENT, request=b"r", request_id="idem")
        assert not created and again.name == op.name and again.last_sequence == 1
        assert (await s.append_event(op.name, "progress_update", b"2")).sequence == 2
        assert await s.schema_version() == 2


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
        assert await s.schema_version() == 2
        running = await s.get_operation("operations/running")
        assert running.state == JobState.RUNNING and running.message == "Detecting" and running.last_sequence == 1
        assert running.request_id == "idem" and await s.get_request("operations/running") == b"\x01\x02"
        assert await s.get_request("operations/done") == b""
        assert [e.sequence for e in await s.events_after("operations/running")] == [1]
        assert (await s.append_event("operations/running", "progress_update", b"2")).sequence == 2


_CHILD = """
import asyncio, sys
from server.jobs.sqlite_store import SqliteJobStore

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
