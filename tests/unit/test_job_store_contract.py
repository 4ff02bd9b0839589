"""The JobStore contract: every test runs on each backend (SQLite, and PostgreSQL on a real
server started by the project), and together they define what the protocol means. A backend
passes all of them or it is not a JobStore. Backend-specific behaviour (SQLite's WAL and file
migrations, PostgreSQL's migrations and outages) lives in each backend's own test file."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.engine.retention import OperationRetention
from server.jobs.store import (
    ApiKeyExistsError,
    ArtifactRecord,
    JobState,
    JobStore,
    LeaseLostError,
    OperationNotFinishedError,
    OperationNotFoundError,
    OperationUpdate,
    OtherTenantError,
    RequestIdConflictError,
)
from server.jobs.store.postgres import PostgresJobStore
from server.jobs.store.sqlite import SqliteJobStore
from tests.conftest import drop_postgres_schema, fresh_postgres_schema

SEGMENT = jobs_pb2.JOB_KIND_SEGMENT_VIDEO
TALKING = jobs_pb2.JOB_KIND_TALKING_VIDEO


@dataclass
class Backend:
    """One backend's data, and a way to open another store object on it (another connection
    for SQLite, another replica's pool for PostgreSQL)."""

    name: str
    _open: Callable[[], Awaitable[JobStore]]
    opened: list[JobStore] = field(default_factory=list)

    async def open(self) -> JobStore:
        store = await self._open()
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path, postgres_server) -> AsyncIterator[Backend]:  # noqa: ANN001
    schema = None
    if request.param == "sqlite":
        path = tmp_path / "jobs.db"

        async def open_() -> JobStore:
            return await SqliteJobStore(path).open()
    else:
        url, schema = await fresh_postgres_schema(postgres_server)

        async def open_() -> JobStore:
            return await PostgresJobStore(url).open()

    b = Backend(request.param, open_)
    yield b
    for s in b.opened:
        await s.close()
    if schema is not None:
        await drop_postgres_schema(postgres_server, schema)


@pytest.fixture
async def store(backend: Backend) -> JobStore:
    return await backend.open()


async def new_op(store: JobStore, **kw) -> str:
    op, created = await store.create_operation(kind=kw.pop("kind", SEGMENT), request=b"req", **kw)
    assert created
    return op.name


def stage_payload(percent: float) -> bytes:
    return jobs_pb2.StageUpdate(stage=jobs_pb2.JOB_STAGE_TRACKING, percent=percent).SerializeToString()


def complete_payload() -> bytes:
    return jobs_pb2.JobComplete(state=jobs_pb2.JOB_STATE_SUCCEEDED).SerializeToString()


# -- records and errors ---------------------------------------------------------------------------


def test_job_state_mirrors_proto() -> None:
    for state in JobState:
        assert jobs_pb2.JobState.Value(f"JOB_STATE_{state.name}") == state.value


def test_lease_lost_error_crosses_the_worker_channel() -> None:
    # The job worker process gets the store's exceptions pickled (server/jobs/worker/ipc.py).
    err = pickle.loads(pickle.dumps(LeaseLostError("operations/x", 3, 4, "replica-b")))
    assert isinstance(err, LeaseLostError)
    assert (err.name, err.epoch, err.current_epoch, err.owner) == ("operations/x", 3, 4, "replica-b")
    assert "epoch 3" in str(err) and "epoch 4" in str(err) and "replica-b" in str(err)


# -- operations -----------------------------------------------------------------------------------


async def test_is_a_job_store(store: JobStore) -> None:
    assert isinstance(store, JobStore)


async def test_create_get_and_update(store: JobStore) -> None:
    op, created = await store.create_operation(kind=TALKING, request=b"\x01\x02", message="queued")
    assert created and op.name.startswith("operations/")
    assert op.state == JobState.QUEUED and not op.done and op.message == "queued"
    assert op.create_time.tzinfo is not None and op.create_time.utcoffset() == timedelta(0)
    assert op.update_time == op.create_time
    assert op.start_time is None and op.end_time is None and op.last_sequence == 0
    assert op.lease_owner is None and op.lease_epoch == 0 and op.lease_expire_time is None
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
    assert await store.get_operation(op.name) == done

    failed_op = await new_op(store)
    failed = await store.update_operation(failed_op, state=JobState.FAILED, error=(9, "no person"))
    assert failed.error == (9, "no person")
    explicit = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
    ended = await store.update_operation(failed_op, end_time=explicit)
    assert ended.end_time == explicit  # microseconds kept

    with pytest.raises(OperationNotFoundError):
        await store.get_operation("operations/nope")
    with pytest.raises(OperationNotFoundError):
        await store.update_operation("operations/nope", percent=1.0)
    with pytest.raises(OperationNotFoundError):
        await store.get_request("operations/nope")
    with pytest.raises(TypeError):
        await store.update_operation(op.name, OperationUpdate(percent=1.0), percent=2.0)


async def test_idempotent_create_by_request_id(store: JobStore) -> None:
    first, created = await store.create_operation(kind=SEGMENT, request=b"a", request_id="r-1")
    again, created_again = await store.create_operation(kind=SEGMENT, request=b"a", request_id="r-1")
    assert created and not created_again and again == first
    assert await store.find_request("r-1", SEGMENT) == first
    assert await store.find_request("r-unknown", SEGMENT) is None
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
    with pytest.raises(RequestIdConflictError):
        await store.find_request("r-1", TALKING)


async def test_duplicate_creates_through_two_stores_make_one_operation(backend: Backend) -> None:
    # Two replicas (or processes) receiving the same retried request at once.
    a, b = await backend.open(), await backend.open()
    results = await asyncio.gather(
        *(s.create_operation(kind=SEGMENT, request=b"x", request_id="same") for s in (a, b, a, b, a, b))
    )
    assert len({op.name for op, _ in results}) == 1 and sum(c for _, c in results) == 1


async def test_list_paging_and_state_filter(store: JobStore) -> None:
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
    # The same filter in another order continues; another filter does not (AIP-158).
    again, _ = await store.list_operations(states=(JobState.QUEUED, JobState.RUNNING), page_size=5, page_token=tok)
    assert [o.name for o in again] == [o.name for o in rest]
    with pytest.raises(ValueError, match="another filter"):
        await store.list_operations(states=JobState.RUNNING, page_token=tok)
    with pytest.raises(ValueError, match="another filter"):
        await store.list_operations(states=(JobState.RUNNING, JobState.QUEUED), kind=SEGMENT, page_token=tok)
    assert (await store.list_operations(kind=TALKING))[0] == []
    assert [o.name for o in (await store.list_operations(kind=SEGMENT, page_size=100))[0]] == names
    assert await store.list_operations(states=()) == ([], "")

    # A token survives deletion of the item it points after.
    items, tok = await store.list_operations(page_size=5)
    await store.delete_operation(names[4])  # SUCCEEDED, in the first page
    rest, _ = await store.list_operations(page_size=50, page_token=tok)
    assert [o.name for o in rest] == names[5:]

    unfinished = await store.unfinished_operations()
    assert [o.name for o in unfinished] == names[:4] + names[6:]
    with pytest.raises(ValueError):
        await store.list_operations(page_token="garbage!!")


async def test_page_size_default_and_cap(store: JobStore) -> None:
    for _ in range(55):
        await new_op(store)
    items, token = await store.list_operations(page_size=0)
    assert len(items) == 50 and token
    items, token = await store.list_operations(page_size=5000)
    assert len(items) == 55 and token == ""


# -- events ---------------------------------------------------------------------------------------


async def test_append_assigns_contiguous_sequences_under_concurrency(store: JobStore) -> None:
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


async def test_two_stores_share_the_sequence(backend: Backend) -> None:
    """Two store objects (two connections / two replicas) appending to one operation: the
    sequence stays contiguous and unique."""
    a, b = await backend.open(), await backend.open()
    name = await new_op(a)

    async def run(s: JobStore) -> list[int]:
        return [(await s.append_event(name, "progress_update", b"")).sequence for _ in range(50)]

    ra, rb = await asyncio.gather(run(a), run(b))
    assert sorted(ra + rb) == list(range(1, 101))
    assert [e.sequence for e in await b.events_after(name, 0)] == list(range(1, 101))


async def test_events_after_resumes_exactly(store: JobStore) -> None:
    name = await new_op(store)
    for i in range(1, 11):
        ev = await store.append_event(name, "stage_update", stage_payload(i))
        assert ev.sequence == i and not ev.terminal and ev.operation == name
        assert ev.time.utcoffset() == timedelta(0)
    last = await store.append_event(
        name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED)
    )
    assert last.sequence == 11 and last.terminal
    op = await store.get_operation(name)
    assert op.last_sequence == 11 and op.state == JobState.SUCCEEDED and op.end_time is not None
    assert op.update_time == last.time  # one time for the event and the change it made

    assert [e.sequence for e in await store.events_after(name, 4)] == list(range(5, 12))
    assert [e.sequence for e in await store.events_after(name, 4, limit=3)] == [5, 6, 7]
    assert await store.events_after(name, 11) == []
    assert await store.events_after("operations/unknown") == []
    stored = await store.events_after(name, 10)
    assert stored == [last]  # what append returned is what is stored
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


async def test_an_event_applies_its_update(store: JobStore) -> None:
    name = await new_op(store)
    update = OperationUpdate(state=JobState.RUNNING, stage=jobs_pb2.JOB_STAGE_TRACKING, percent=40.0, message="m")
    ev = await store.append_event(name, "stage_update", stage_payload(40), update=update)
    op = await store.get_operation(name)
    assert (op.state, op.stage, op.percent, op.message) == (JobState.RUNNING, jobs_pb2.JOB_STAGE_TRACKING, 40.0, "m")
    assert op.start_time == ev.time and op.last_sequence == 1
    # An empty update changes only the sequence and the time.
    ev2 = await store.append_event(name, "progress_update", b"", update=OperationUpdate())
    after = await store.get_operation(name)
    assert after.last_sequence == 2 and after.update_time == ev2.time and after.percent == 40.0


# -- cancel, artifacts, deletion, retention -------------------------------------------------------


async def test_cancel_artifacts_and_delete_only_finished(store: JobStore) -> None:
    name = await new_op(store)
    await store.append_event(name, "progress_update", b"p")
    expire = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    art = ArtifactRecord(name, "overlay.mp4", 3, "video/mp4", "/data/a/overlay.mp4", 10, "ab", expire)
    assert await store.add_artifact(art) == art
    await store.add_artifact(ArtifactRecord(name, "frames.json", 4, "application/json", "/data/a/f.json", 5, "cd"))
    await store.add_artifact(
        ArtifactRecord(name, "overlay.mp4", 3, "video/mp4", "/data/a/overlay.mp4", 11, "ef", expire)
    )
    arts = await store.list_artifacts(name)
    assert [a.name for a in arts] == ["frames.json", "overlay.mp4"]
    assert arts[1].size == 11 and arts[1].sha256 == "ef" and arts[1].expire_time == expire
    assert arts[0].expire_time is None
    assert await store.list_artifacts("operations/unknown") == []
    with pytest.raises(OperationNotFoundError):
        await store.add_artifact(ArtifactRecord("operations/x", "a", 1, "x", "/p", 1, "s"))

    cancelled = await store.request_cancel(name)
    assert cancelled.cancel_requested and cancelled.state == JobState.QUEUED
    assert (await store.request_cancel(name)) == cancelled  # again: nothing changes

    with pytest.raises(OperationNotFinishedError):
        await store.delete_operation(name)
    await store.update_operation(name, state=JobState.RUNNING)
    with pytest.raises(OperationNotFinishedError) as raised:
        await store.delete_operation(name)
    assert raised.value.state == JobState.RUNNING
    await store.update_operation(name, state=JobState.CANCELLED)
    finished = await store.get_operation(name)
    assert await store.request_cancel(name) == finished  # a finished operation: a no-op
    paths = await store.delete_operation(name)
    assert sorted(paths) == ["/data/a/f.json", "/data/a/overlay.mp4"]
    with pytest.raises(OperationNotFoundError):
        await store.get_operation(name)
    assert await store.events_after(name) == [] and await store.list_artifacts(name) == []
    with pytest.raises(OperationNotFoundError):
        await store.delete_operation(name)
    with pytest.raises(OperationNotFoundError):
        await store.request_cancel(name)
    # Deleting an operation without artifacts returns no paths.
    bare = await new_op(store)
    await store.update_operation(bare, state=JobState.FAILED, error=(13, "x"))
    assert await store.delete_operation(bare) == []


async def test_a_finished_operation_forgets_its_request(store: JobStore) -> None:
    # The request can carry an inline photo and audio (tens of MB): kept while the job may run (a
    # resumed job reads it), dropped with the terminal state.
    op, _ = await store.create_operation(kind=TALKING, request=b"photo+audio" * 1000)
    await store.update_operation(op.name, state=JobState.RUNNING)
    assert len(await store.get_request(op.name)) == 11000
    await store.append_event(op.name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED))
    done = await store.get_operation(op.name)
    assert done.state == JobState.SUCCEEDED and await store.get_request(op.name) == b"" and done.end_time is not None
    # Through update_operation too.
    other, _ = await store.create_operation(kind=TALKING, request=b"photo")
    await store.update_operation(other.name, state=JobState.FAILED, error=(9, "x"))
    assert await store.get_request(other.name) == b""


async def test_operation_retention_deletes_what_finished_long_ago(store: JobStore, tmp_path: Path) -> None:
    old, recent, running = await new_op(store), await new_op(store), await new_op(store)
    artifact = tmp_path / "old.mp4"
    artifact.write_bytes(b"mp4")
    await store.add_artifact(ArtifactRecord(old, "talking_video.mp4", 6, "video/mp4", str(artifact), 3, "ab"))
    ended = datetime(2026, 1, 1, tzinfo=UTC)
    await store.update_operation(old, state=JobState.SUCCEEDED, end_time=ended)
    await store.update_operation(recent, state=JobState.FAILED, end_time=ended + timedelta(days=29))
    await store.update_operation(running, state=JobState.RUNNING)
    assert await store.finished_before(ended + timedelta(days=1)) == [old]
    assert await store.finished_before(ended + timedelta(days=60)) == [old, recent]  # oldest first
    assert await store.finished_before(ended + timedelta(days=60), limit=1) == [old]

    retention = OperationRetention(store, retention_s=30 * 86400, interval_s=3600, batch=1)
    assert await retention.purge_once(now=ended + timedelta(days=30, seconds=1)) == 1
    with pytest.raises(OperationNotFoundError):
        await store.get_operation(old)
    assert not artifact.exists()  # its files go with it
    assert (await store.get_operation(recent)).state == JobState.FAILED  # 29 days: kept
    assert (await store.get_operation(running)).state == JobState.RUNNING  # never finished: never due
    assert await retention.purge_once(now=ended + timedelta(days=60)) == 1  # batches of 1: loops until done
    assert [op.name for op in (await store.list_operations())[0]] == [running]


async def test_reopen_keeps_everything(backend: Backend) -> None:
    s = await backend.open()
    op, _ = await s.create_operation(kind=SEGMENT, request=b"r", request_id="idem")
    await s.append_event(op.name, "progress_update", b"1")
    await s.close()
    s = await backend.open()
    again, created = await s.create_operation(kind=SEGMENT, request=b"r", request_id="idem")
    assert not created and again.name == op.name and again.last_sequence == 1
    assert await s.get_request(op.name) == b"r"
    assert (await s.append_event(op.name, "progress_update", b"2")).sequence == 2


# -- claiming, leases and fencing -----------------------------------------------------------------

LONG_LEASE_S = 60.0


async def test_claims_follow_creation_order(store: JobStore) -> None:
    names = [await new_op(store) for _ in range(6)]
    await store.update_operation(names[1], state=JobState.SUCCEEDED)  # finished: never claimed
    await store.update_operation(names[3], state=JobState.RUNNING)  # left RUNNING unleased: claimable
    claimed = []
    while (op := await store.claim_next("replica-a", LONG_LEASE_S)) is not None:
        claimed.append(op)
    assert [op.name for op in claimed] == [names[0], names[2], names[3], names[4], names[5]]
    for op in claimed:
        assert op.lease_owner == "replica-a" and op.lease_epoch == 1
        assert op.lease_expire_time is not None and op.lease_expire_time > op.create_time
        assert await store.get_operation(op.name) == op
    assert claimed[0].state == JobState.QUEUED and claimed[2].state == JobState.RUNNING  # states kept
    # A cancel request does not hide a queued job: its claimer is the one that cancels it.
    late = await new_op(store)
    await store.request_cancel(late)
    got = await store.claim_next("replica-b", LONG_LEASE_S)
    assert got is not None and got.name == late and got.cancel_requested
    assert await store.claim_next("replica-b", LONG_LEASE_S) is None
    with pytest.raises(ValueError):
        await store.claim_next("", LONG_LEASE_S)
    with pytest.raises(ValueError):
        await store.claim_next("replica-a", 0)


async def test_three_claimers_take_sixty_jobs_exactly_once(backend: Backend) -> None:
    """Three replicas claiming at once from the same queue: every job goes to exactly one."""
    stores = [await backend.open() for _ in range(3)]
    names = [await new_op(stores[0]) for _ in range(60)]

    async def claimer(s: JobStore, replica: str) -> list[str]:
        got = []
        while (op := await s.claim_next(replica, LONG_LEASE_S)) is not None:
            assert op.lease_owner == replica and op.lease_epoch == 1
            got.append(op.name)
        return got

    results = await asyncio.gather(*(claimer(s, f"replica-{i}") for i, s in enumerate(stores)))
    claimed = [n for r in results for n in r]
    assert sorted(claimed) == sorted(names) and len(set(claimed)) == 60
    for r in results:  # each claimer took its jobs oldest first
        assert r == sorted(r, key=names.index)
    owners = {op.name: op.lease_owner for op in await stores[1].unfinished_operations()}
    assert all(owners[n] == f"replica-{i}" for i, r in enumerate(results) for n in r)


async def test_an_expired_lease_is_taken_over_with_the_next_epoch(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    name = await new_op(a)
    first = await a.claim_next("replica-a", 0.3)
    assert first is not None and first.name == name and first.lease_epoch == 1
    assert await b.claim_next("replica-b", LONG_LEASE_S) is None  # held
    await asyncio.sleep(0.45)  # replica-a stopped renewing (frozen, killed, partitioned)
    taken = await b.claim_next("replica-b", LONG_LEASE_S)
    assert taken is not None and taken.name == name
    assert taken.lease_owner == "replica-b" and taken.lease_epoch == 2
    assert await a.claim_next("replica-a", LONG_LEASE_S) is None
    with pytest.raises(LeaseLostError) as lost:
        await a.renew_lease(name, "replica-a", 1, LONG_LEASE_S)
    assert lost.value.current_epoch == 2 and lost.value.owner == "replica-b"


async def test_a_claimer_skips_the_lapsed_jobs_it_still_runs_and_renews_them(store: JobStore) -> None:
    """A store outage longer than the lease: the holder still runs the job, so it passes it by
    when it claims (skip) and takes the lapsed lease back by renewing it, at the same epoch."""
    held, other = await new_op(store), await new_op(store)
    first = await store.claim_next("replica-a", 0.2)
    assert first is not None and first.name == held
    await asyncio.sleep(0.3)  # lapsed: nobody renewed it
    got = await store.claim_next("replica-a", LONG_LEASE_S, skip=[held])
    assert got is not None and got.name == other  # the next one, not a second run of the first
    assert await store.claim_next("replica-a", LONG_LEASE_S, skip=[held]) is None
    renewed = await store.renew_lease(held, "replica-a", 1, LONG_LEASE_S)
    assert renewed.lease_owner == "replica-a" and renewed.lease_epoch == 1
    assert await store.claim_next("replica-b", LONG_LEASE_S) is None  # held again


async def test_a_fenced_write_is_refused_and_leaves_no_trace(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    name = await new_op(a)
    claimed = await a.claim_next("replica-a", 0.2)
    assert claimed is not None
    await a.append_event(
        name, "stage_update", stage_payload(1), update=OperationUpdate(state=JobState.RUNNING), epoch=1
    )
    await a.add_artifact(ArtifactRecord(name, "a.mp4", 3, "video/mp4", "/a", 1, "a1"), epoch=1)
    await asyncio.sleep(0.3)
    assert (await b.claim_next("replica-b", LONG_LEASE_S)).lease_epoch == 2  # type: ignore[union-attr]
    before = await b.get_operation(name)
    events_before = await b.events_after(name)
    artifacts_before = await b.list_artifacts(name)

    # The zombie wakes up and tries every kind of write with its old epoch.
    with pytest.raises(LeaseLostError):
        await a.append_event(name, "progress_update", b"zombie", epoch=1)
    with pytest.raises(LeaseLostError):
        await a.append_event(
            name, "complete", complete_payload(), update=OperationUpdate(state=JobState.SUCCEEDED), epoch=1
        )
    with pytest.raises(LeaseLostError):
        await a.update_operation(name, OperationUpdate(state=JobState.FAILED, error=(13, "zombie")), epoch=1)
    with pytest.raises(LeaseLostError):
        await a.update_operation(name, last_completed_stage=5, epoch=1)
    with pytest.raises(LeaseLostError):
        await a.add_artifact(ArtifactRecord(name, "a.mp4", 3, "video/mp4", "/zombie", 9, "z"), epoch=1)
    with pytest.raises(LeaseLostError):
        await a.add_artifact(ArtifactRecord(name, "b.mp4", 3, "video/mp4", "/zombie", 9, "z"), epoch=1)
    with pytest.raises(OperationNotFoundError):
        await a.append_event("operations/unknown", "progress_update", b"", epoch=1)

    # No trace: same row (times included), same events, same artifacts, the request kept.
    assert await b.get_operation(name) == before
    assert await b.events_after(name) == events_before
    assert await b.list_artifacts(name) == artifacts_before
    assert await b.get_request(name) == b"req"
    # The new holder goes on from where the store is: the refused event took no sequence.
    ev = await b.append_event(name, "progress_update", b"b", epoch=2)
    assert ev.sequence == before.last_sequence + 1
    await b.add_artifact(ArtifactRecord(name, "a.mp4", 3, "video/mp4", "/b", 2, "b2"), epoch=2)
    done = await b.update_operation(name, state=JobState.SUCCEEDED, epoch=2)
    assert done.state == JobState.SUCCEEDED and done.lease_owner == "replica-b"
    assert [x.path for x in await b.list_artifacts(name)] == ["/b"]
    # Writes without an epoch (callers that do not hold leases) are not fenced.
    assert (await a.update_operation(name, message="unfenced")).message == "unfenced"


async def test_a_zombie_racing_the_takeover_never_writes_after_it(backend: Backend) -> None:
    """The old holder appends as fast as it can while the new one takes over: every event it was
    told is stored comes before the takeover's first, and none after; no gap, no duplicate."""
    a, b = await backend.open(), await backend.open()
    name = await new_op(a)
    assert await a.claim_next("replica-a", 0.25) is not None
    stored_by_a: list[int] = []

    async def zombie() -> None:
        while True:
            try:
                stored_by_a.append((await a.append_event(name, "progress_update", b"a", epoch=1)).sequence)
            except LeaseLostError:
                return

    task = asyncio.create_task(zombie())
    deadline = time.monotonic() + 10
    while (taken := await b.claim_next("replica-b", LONG_LEASE_S)) is None:
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.02)
    stored_by_b = [
        (await b.append_event(name, "progress_update", b"b", epoch=taken.lease_epoch)).sequence for _ in range(5)
    ]
    await asyncio.wait_for(task, 10)
    assert stored_by_a and stored_by_a == list(range(1, len(stored_by_a) + 1))
    assert stored_by_b == list(range(len(stored_by_a) + 1, len(stored_by_a) + 6))
    events = await b.events_after(name, 0, limit=10_000)
    assert [e.payload for e in events] == [b"a"] * len(stored_by_a) + [b"b"] * 5


async def test_renewal_keeps_the_lease(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    name = await new_op(a)
    claimed = await a.claim_next("replica-a", 0.3)
    assert claimed is not None
    expiry = claimed.lease_expire_time
    for _ in range(8):  # 0.8 s: well past the first expiry, renewed every 0.1 s
        await asyncio.sleep(0.1)
        renewed = await a.renew_lease(name, "replica-a", 1, 0.3)
        assert renewed.lease_epoch == 1 and renewed.lease_owner == "replica-a"
        assert renewed.lease_expire_time is not None and expiry is not None and renewed.lease_expire_time > expiry
        expiry = renewed.lease_expire_time
        assert await b.claim_next("replica-b", LONG_LEASE_S) is None
    # Expired but nobody took it: the holder may still renew, and keeps its epoch.
    await asyncio.sleep(0.4)
    assert (await a.renew_lease(name, "replica-a", 1, LONG_LEASE_S)).lease_epoch == 1
    assert await b.claim_next("replica-b", LONG_LEASE_S) is None
    with pytest.raises(LeaseLostError):
        await a.renew_lease(name, "replica-b", 1, LONG_LEASE_S)  # not the holder
    with pytest.raises(LeaseLostError):
        await a.renew_lease(name, "replica-a", 2, LONG_LEASE_S)  # not its epoch
    with pytest.raises(OperationNotFoundError):
        await a.renew_lease("operations/unknown", "replica-a", 1, LONG_LEASE_S)
    # A finished job's lease cannot be renewed (there is nothing left to hold).
    await a.update_operation(name, state=JobState.SUCCEEDED, epoch=1)
    with pytest.raises(LeaseLostError):
        await a.renew_lease(name, "replica-a", 1, LONG_LEASE_S)


async def test_a_released_lease_is_claimable_at_once(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    name = await new_op(a)
    held = await a.claim_next("replica-a", LONG_LEASE_S)
    assert held is not None and await b.claim_next("replica-b", LONG_LEASE_S) is None
    await a.release_lease(name, "replica-b", 1)  # not the holder: a no-op
    assert await b.claim_next("replica-b", LONG_LEASE_S) is None
    await a.release_lease(name, "replica-a", 1)  # draining: hands the job back
    taken = await b.claim_next("replica-b", LONG_LEASE_S)
    assert taken is not None and taken.name == name and taken.lease_epoch == 2
    with pytest.raises(LeaseLostError):
        await a.append_event(name, "progress_update", b"", epoch=1)


async def test_waiting_jobs_are_counted_and_placed_in_claim_order(backend: Backend) -> None:
    """What the engine shows as the cluster's queue: unfinished and held by no live lease."""
    a, b = await backend.open(), await backend.open()
    names = [await new_op(a) for _ in range(3)]
    assert await b.count_waiting() == 3
    assert [await b.waiting_position(n) for n in names] == [0, 1, 2]
    held = await a.claim_next("replica-a", LONG_LEASE_S)
    assert held is not None and held.name == names[0]
    assert await b.count_waiting() == 2
    assert [await b.waiting_position(n) for n in names] == [-1, 0, 1]
    await a.update_operation(names[1], state=JobState.CANCELLED)
    assert await b.count_waiting() == 1 and await b.waiting_position(names[1]) == -1
    assert await b.waiting_position(names[2]) == 0
    assert await b.waiting_position("operations/" + "0" * 32) == -1
    short = await a.claim_next("replica-a", 0.05)  # a lease that lapses: waiting again
    assert short is not None and short.name == names[2]
    await asyncio.sleep(0.1)
    assert await b.count_waiting() == 1 and await b.waiting_position(names[2]) == 0


async def test_a_cluster_duty_has_one_holder_at_a_time(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    if backend.name == "sqlite":  # one replica: every duty is its own
        assert await a.try_cluster_duty("retention") and await b.try_cluster_duty("retention")
        return
    assert await a.try_cluster_duty("retention")
    assert not await b.try_cluster_duty("retention")
    assert await a.try_cluster_duty("retention")  # kept while its holder lives
    assert await b.try_cluster_duty("storage-cleanup")  # another duty: another lock
    await a.close()
    assert await b.try_cluster_duty("retention")


async def test_replicas_register_and_heartbeat(backend: Backend) -> None:
    a, b = await backend.open(), await backend.open()
    assert await a.list_replicas() == []
    first = await a.register_replica("replica-a", "127.0.0.1:50061")
    assert first.replica_id == "replica-a" and first.address == "127.0.0.1:50061"
    assert first.register_time == first.heartbeat_time and first.register_time.tzinfo is not None
    await b.register_replica("replica-b", "127.0.0.1:50062")
    await asyncio.sleep(0.05)
    # A heartbeat keeps the registration time, moves the heartbeat, and takes a new address.
    again = await a.register_replica("replica-a", "10.0.0.5:50051")
    assert again.register_time == first.register_time and again.heartbeat_time > first.heartbeat_time
    listed = await b.list_replicas()  # what one replica writes, another sees
    assert [(r.replica_id, r.address) for r in listed] == [("replica-a", "10.0.0.5:50051"), ("replica-b", "127.0.0.1:50062")]
    assert listed[0] == again
    with pytest.raises(ValueError):
        await a.register_replica("", "127.0.0.1:1")


async def test_list_replicas_seen_within_leaves_out_the_silent(store: JobStore) -> None:
    await store.register_replica("replica-quiet", "127.0.0.1:1")
    await asyncio.sleep(0.6)
    await store.register_replica("replica-alive", "127.0.0.1:2")
    assert [r.replica_id for r in await store.list_replicas(seen_within_s=0.4)] == ["replica-alive"]
    assert [r.replica_id for r in await store.list_replicas(seen_within_s=60)] == ["replica-alive", "replica-quiet"]
    assert [r.replica_id for r in await store.list_replicas()] == ["replica-alive", "replica-quiet"]



# -- tracking sessions handed off by a draining replica ---------------------------------------------


async def test_session_state_is_taken_once_by_another_replica(backend: Backend) -> None:
    draining, resuming = await backend.open(), await backend.open()
    state = bytes(range(256)) * 16_384  # 4 MiB, every byte value: stored and returned as is
    await draining.put_session_state("session-a", state, ttl_s=60)
    assert await resuming.take_session_state("session-a") == state
    assert await resuming.take_session_state("session-a") is None  # taken: gone
    assert await draining.take_session_state("session-a") is None
    assert await resuming.take_session_state("never-stored") is None


async def test_session_state_put_again_replaces_it(store: JobStore) -> None:
    await store.put_session_state("session-b", b"first", ttl_s=60)
    await store.put_session_state("session-b", b"second", ttl_s=60)
    assert await store.take_session_state("session-b") == b"second"
    assert await store.take_session_state("session-b") is None


async def test_expired_session_state_is_not_returned(store: JobStore) -> None:
    await store.put_session_state("session-short", b"old", ttl_s=0.2)
    await store.put_session_state("session-long", b"kept", ttl_s=60)
    await asyncio.sleep(0.4)
    assert await store.take_session_state("session-short") is None
    assert await store.take_session_state("session-long") == b"kept"


async def test_racing_takers_get_the_session_state_exactly_once(backend: Backend) -> None:
    writer = await backend.open()
    takers = [await backend.open() for _ in range(4)]
    for round_ in range(5):
        key = f"session-race-{round_}"
        await writer.put_session_state(key, key.encode(), ttl_s=60)
        got = await asyncio.gather(*(t.take_session_state(key) for t in takers))
        assert sorted(g for g in got if g is not None) == [key.encode()]
        assert got.count(None) == len(takers) - 1


async def test_session_state_arguments_are_checked(store: JobStore) -> None:
    with pytest.raises(ValueError, match="key"):
        await store.put_session_state("", b"x", ttl_s=60)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.put_session_state("session-c", b"x", ttl_s=0)


# -- tenancy --------------------------------------------------------------------------------------


async def test_an_operation_belongs_to_its_tenant_and_is_not_found_by_another(store: JobStore) -> None:
    mine, _ = await store.create_operation(kind=SEGMENT, request=b"a", tenant="acme")
    legacy = await new_op(store)  # no tenant given: the default one
    assert mine.tenant == "acme" and (await store.get_operation(legacy)).tenant == "default"
    assert (await store.get_operation(mine.name, tenant="acme")) == mine
    assert (await store.get_operation(mine.name)) == mine  # the engine's lookup: any tenant
    with pytest.raises(OtherTenantError) as foreign:
        await store.get_operation(mine.name, tenant="globex")
    with pytest.raises(OperationNotFoundError) as unknown:
        await store.get_operation("operations/" + "0" * 32, tenant="globex")
    # The refusal reads exactly as for a name that does not exist, apart from the name itself.
    assert str(foreign.value).replace(mine.name, "N") == str(unknown.value).replace("operations/" + "0" * 32, "N")
    assert not isinstance(unknown.value, OtherTenantError)


async def test_another_tenant_cannot_cancel_delete_or_read_artifacts(store: JobStore) -> None:
    running, _ = await store.create_operation(kind=SEGMENT, request=b"a", tenant="acme")
    with pytest.raises(OtherTenantError):
        await store.request_cancel(running.name, tenant="globex")
    assert not (await store.get_operation(running.name)).cancel_requested  # nothing was set
    assert (await store.request_cancel(running.name, tenant="acme")).cancel_requested

    done, _ = await store.create_operation(kind=SEGMENT, request=b"b", tenant="acme")
    await store.add_artifact(ArtifactRecord(done.name, "overlay.mp4", 3, "video/mp4", "/data/o.mp4", 7, "ab"))
    await store.update_operation(done.name, state=JobState.SUCCEEDED)
    assert await store.list_artifacts(done.name, tenant="globex") == []
    assert [a.name for a in await store.list_artifacts(done.name, tenant="acme")] == ["overlay.mp4"]
    with pytest.raises(OtherTenantError):
        await store.delete_operation(done.name, tenant="globex")
    assert (await store.get_operation(done.name)).state == JobState.SUCCEEDED  # still there
    assert await store.delete_operation(done.name, tenant="acme") == ["/data/o.mp4"]


async def test_listing_shows_one_tenants_operations_and_its_token_stays_its_own(store: JobStore) -> None:
    acme = [(await store.create_operation(kind=SEGMENT, request=b"a", tenant="acme"))[0].name for _ in range(3)]
    globex = [(await store.create_operation(kind=SEGMENT, request=b"g", tenant="globex"))[0].name for _ in range(2)]
    page, token = await store.list_operations(tenant="acme", page_size=2)
    rest, end = await store.list_operations(tenant="acme", page_size=2, page_token=token)
    assert [o.name for o in page + rest] == acme and end == ""
    assert [o.name for o in (await store.list_operations(tenant="globex"))[0]] == globex
    assert len((await store.list_operations())[0]) == 5  # unscoped: every tenant (the engine's view)
    with pytest.raises(ValueError, match="another filter"):
        await store.list_operations(tenant="globex", page_size=2, page_token=token)


async def test_request_ids_are_per_tenant(store: JobStore) -> None:
    a, created_a = await store.create_operation(kind=SEGMENT, request=b"a", request_id="r-1", tenant="acme")
    g, created_g = await store.create_operation(kind=SEGMENT, request=b"g", request_id="r-1", tenant="globex")
    assert created_a and created_g and a.name != g.name and g.tenant == "globex" and g.request_id == "r-1"
    again, created = await store.create_operation(kind=SEGMENT, request=b"a", request_id="r-1", tenant="acme")
    assert not created and again.name == a.name
    assert (await store.find_request("r-1", SEGMENT, tenant="globex")).name == g.name  # type: ignore[union-attr]
    assert await store.find_request("r-1", SEGMENT, tenant="initech") is None
    # Another tenant's key of another kind is no conflict: kinds are compared within a tenant.
    t, created_t = await store.create_operation(kind=TALKING, request=b"t", request_id="r-1", tenant="initech")
    assert created_t and t.kind == TALKING
    with pytest.raises(RequestIdConflictError):
        await store.create_operation(kind=TALKING, request=b"a", request_id="r-1", tenant="acme")


async def test_tenant_usage_counts_one_tenants_operations_and_artifacts(store: JobStore) -> None:
    a1, _ = await store.create_operation(kind=SEGMENT, request=b"a", tenant="acme")
    a2, _ = await store.create_operation(kind=SEGMENT, request=b"a", tenant="acme")
    g1, _ = await store.create_operation(kind=SEGMENT, request=b"g", tenant="globex")
    await store.add_artifact(ArtifactRecord(a1.name, "x.mp4", 3, "video/mp4", "/d/1", 100, "s"))
    await store.add_artifact(ArtifactRecord(a1.name, "y.zip", 6, "application/zip", "/d/2", 23, "s"))
    await store.add_artifact(ArtifactRecord(g1.name, "x.mp4", 3, "video/mp4", "/d/3", 5000, "s"))
    names, files, size = await store.tenant_usage("acme")
    assert sorted(names) == sorted([a1.name, a2.name]) and (files, size) == (2, 123)
    assert await store.tenant_usage("nobody") == ([], 0, 0)


async def test_a_handed_off_session_is_taken_only_by_its_tenant(backend: Backend) -> None:
    draining, resuming = await backend.open(), await backend.open()
    await draining.put_session_state("shared-key", b"acme-state", ttl_s=60, tenant="acme")
    await draining.put_session_state("shared-key", b"globex-state", ttl_s=60, tenant="globex")
    assert await resuming.take_session_state("shared-key", tenant="initech") is None
    assert await resuming.take_session_state("shared-key") is None  # the default tenant's: none
    assert await resuming.take_session_state("shared-key", tenant="acme") == b"acme-state"
    assert await resuming.take_session_state("shared-key", tenant="acme") is None
    assert await resuming.take_session_state("shared-key", tenant="globex") == b"globex-state"


# -- API keys -------------------------------------------------------------------------------------


async def test_an_api_key_is_created_read_and_listed_per_tenant(store: JobStore) -> None:
    assert not await store.has_api_keys()
    expires = datetime.now(UTC) + timedelta(days=1)
    a = await store.create_api_key(
        key_id="k1", tenant="acme", scopes=("vision", "jobs:read"), secret_hash="aa" * 32, expire_time=expires
    )
    assert (a.key_id, a.tenant, a.scopes, a.secret_hash) == ("k1", "acme", ("vision", "jobs:read"), "aa" * 32)
    assert a.revoke_time is None and a.last_used_time is None
    assert abs((a.expire_time - expires).total_seconds()) < 1e-3
    assert abs((a.create_time - datetime.now(UTC)).total_seconds()) < 60
    await store.create_api_key(key_id="k2", tenant="other", scopes=(), secret_hash="bb" * 32, expire_time=None)
    assert await store.has_api_keys()
    assert await store.get_api_key("k1") == a
    assert await store.get_api_key("nope") is None
    assert [k.key_id for k in await store.list_api_keys()] == ["k1", "k2"]
    assert [k.key_id for k in await store.list_api_keys(tenant="other")] == ["k2"]
    assert (await store.get_api_key("k2")).scopes == () and (await store.get_api_key("k2")).expire_time is None
    assert await store.list_api_keys(tenant="nobody") == []


async def test_an_api_key_id_is_never_reused(store: JobStore) -> None:
    await store.create_api_key(key_id="k1", tenant="acme", scopes=("vision",), secret_hash="aa" * 32, expire_time=None)
    with pytest.raises(ApiKeyExistsError):
        await store.create_api_key(key_id="k1", tenant="evil", scopes=("admin",), secret_hash="cc" * 32, expire_time=None)
    kept = await store.get_api_key("k1")
    assert (kept.tenant, kept.scopes, kept.secret_hash) == ("acme", ("vision",), "aa" * 32)
    with pytest.raises(ValueError):
        await store.create_api_key(key_id="k3", tenant="acme", scopes=("two words",), secret_hash="aa" * 32, expire_time=None)
    with pytest.raises(ValueError):
        await store.create_api_key(key_id="", tenant="acme", scopes=(), secret_hash="aa" * 32, expire_time=None)


async def test_a_revocation_is_seen_at_once_by_another_replica(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()
    await one.create_api_key(key_id="k1", tenant="acme", scopes=("vision",), secret_hash="aa" * 32, expire_time=None)
    assert (await two.get_api_key("k1")).revoke_time is None
    revoked = await two.revoke_api_key("k1")
    assert revoked is not None and revoked.revoke_time is not None
    assert (await one.get_api_key("k1")).revoke_time == revoked.revoke_time
    # Revoking again keeps the first time; an unknown id is None.
    assert (await one.revoke_api_key("k1")).revoke_time == revoked.revoke_time
    assert await one.revoke_api_key("nope") is None
    # A revoked key still counts: --auth auto must not fall open when the last key is revoked.
    assert await two.has_api_keys()


async def test_touching_an_api_key_records_its_last_use(store: JobStore) -> None:
    await store.create_api_key(key_id="k1", tenant="acme", scopes=(), secret_hash="aa" * 32, expire_time=None)
    before = datetime.now(UTC) - timedelta(seconds=5)
    await store.touch_api_key("k1")
    await store.touch_api_key("unknown")  # a no-op, not an error
    used = (await store.get_api_key("k1")).last_used_time
    assert used is not None and before <= used <= datetime.now(UTC) + timedelta(seconds=5)


async def test_api_keys_survive_a_reopen(backend: Backend) -> None:
    first = await backend.open()
    await first.create_api_key(key_id="k1", tenant="acme", scopes=("admin",), secret_hash="aa" * 32, expire_time=None)
    await first.close()
    again = await backend.open()
    assert (await again.get_api_key("k1")).scopes == ("admin",)


# -- per-tenant quotas (server/quotas/) ----------------------------------------------------------


async def test_quota_overrides_are_set_cleared_and_listed_per_tenant(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()
    assert await one.tenant_quotas("acme") == {}
    after = await one.set_tenant_quotas("acme", {"sessions": 2, "rate.vision": 0.5, "burst.vision": 3})
    assert after == {"burst.vision": 3.0, "rate.vision": 0.5, "sessions": 2.0}
    await one.set_tenant_quotas("globex", {"jobs": 7})
    # Another replica's store sees the change at once; None clears one override, the rest stay.
    assert await two.set_tenant_quotas("acme", {"rate.vision": None, "sessions": 4}) == {"burst.vision": 3.0, "sessions": 4.0}
    assert await one.all_tenant_quotas() == {"acme": {"burst.vision": 3.0, "sessions": 4.0}, "globex": {"jobs": 7.0}}
    assert await one.tenant_quotas("initech") == {}


async def test_a_bad_quota_override_stores_nothing(store: JobStore) -> None:
    for bad in ({"sessions": -1}, {"nope": 1}, {"jobs": 1.5}, {"rate.vision": float("nan")}, {"rate.vision": float("inf")}):
        with pytest.raises(ValueError):
            await store.set_tenant_quotas("acme", {"sessions": 3, **bad})
    with pytest.raises(ValueError):
        await store.set_tenant_quotas("", {"sessions": 3})
    assert await store.tenant_quotas("acme") == {}


async def test_quota_leases_never_exceed_the_limit_and_do_not_count_a_key_twice(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()
    assert await one.acquire_quota_lease("sessions", "acme", "s1", "replica-a", 2, 30) == (True, 1)
    # The same key again (a resume on another replica): renewed and moved, not counted twice.
    assert await two.acquire_quota_lease("sessions", "acme", "s1", "replica-b", 2, 30) == (True, 1)
    assert await two.acquire_quota_lease("sessions", "acme", "s2", "replica-b", 2, 30) == (True, 2)
    assert await one.acquire_quota_lease("sessions", "acme", "s3", "replica-a", 2, 30) == (False, 2)
    # Another tenant's slots are its own, even under the same key.
    assert await one.acquire_quota_lease("sessions", "globex", "s1", "replica-a", 1, 30) == (True, 1)
    assert await one.count_quota_leases("sessions", "acme") == 2
    await one.release_quota_lease("sessions", "acme", "s1", "replica-a")  # s1 moved to replica-b: a no-op
    assert await one.count_quota_leases("sessions", "acme") == 2
    await one.release_quota_lease("sessions", "acme", "s1", "replica-b")
    await one.release_quota_lease("sessions", "acme", "never-held", "replica-a")  # a no-op
    assert await two.acquire_quota_lease("sessions", "acme", "s3", "replica-b", 2, 30) == (True, 2)
    assert await one.acquire_quota_lease("sessions", "acme", "s4", "replica-a", 0, 30) == (True, 3)  # 0: unlimited
    with pytest.raises(ValueError):
        await one.acquire_quota_lease("sessions", "acme", "", "replica-a", 2, 30)


async def test_racing_acquirers_on_two_stores_take_exactly_the_limit(backend: Backend) -> None:
    one, two = await backend.open(), await backend.open()
    results = await asyncio.gather(
        *(
            (one if i % 2 else two).acquire_quota_lease("sessions", "acme", f"s{i}", f"replica-{i % 2}", 3, 30)
            for i in range(12)
        )
    )
    assert sum(granted for granted, _ in results) == 3
    assert await one.count_quota_leases("sessions", "acme") == 3


async def test_a_lapsed_quota_lease_frees_its_slot(store: JobStore) -> None:
    assert (await store.acquire_quota_lease("sessions", "acme", "s1", "replica-gone", 1, 0.2))[0]
    assert await store.acquire_quota_lease("sessions", "acme", "s2", "replica-a", 1, 30) == (False, 1)
    await asyncio.sleep(0.3)
    assert await store.count_quota_leases("sessions", "acme") == 0
    assert await store.acquire_quota_lease("sessions", "acme", "s2", "replica-a", 1, 30) == (True, 1)


async def test_renewing_keeps_a_holders_live_slots_and_frees_the_others(store: JobStore) -> None:
    for key in ("s1", "s2"):
        await store.acquire_quota_lease("sessions", "acme", key, "replica-a", 0, 0.5)
    await store.acquire_quota_lease("sessions", "acme", "s3", "replica-b", 0, 0.5)
    # replica-a holds only s1 now (s2 ended); replica-b's slot is not its business.
    await store.renew_quota_leases("sessions", "replica-a", [("acme", "s1")], 30)
    assert await store.count_quota_leases("sessions", "acme") == 2
    await asyncio.sleep(0.6)  # replica-b never renewed: its slot lapsed; s1 was renewed
    assert await store.count_quota_leases("sessions", "acme") == 1
    assert await store.acquire_quota_lease("sessions", "acme", "s1", "replica-a", 1, 30) == (True, 1)
    await store.renew_quota_leases("sessions", "replica-a", [], 30)  # holds nothing any more
    assert await store.count_quota_leases("sessions", "acme") == 0


async def test_tenant_jobs_count_queued_and_running_only(store: JobStore) -> None:
    queued, _ = await store.create_operation(kind=SEGMENT, request=b"a", tenant="acme")
    running, _ = await store.create_operation(kind=SEGMENT, request=b"b", tenant="acme")
    done, _ = await store.create_operation(kind=SEGMENT, request=b"c", tenant="acme")
    await store.create_operation(kind=SEGMENT, request=b"d", tenant="globex")
    await store.update_operation(running.name, state=JobState.RUNNING)
    await store.update_operation(done.name, state=JobState.SUCCEEDED)
    assert await store.count_tenant_jobs("acme") == 2
    assert await store.count_tenant_jobs("globex") == 1
    assert await store.count_tenant_jobs("initech") == 0
