"""Tenancy: every operation, upload, artifact and tracking session belongs to a tenant, and
another tenant can neither see, change, download nor resume it.

First against the real orchestrator (``python -m server --auth required`` with real Triton, API
keys made by ``framewise admin keys create``): tracking sessions, jobs and /metrics as two
tenants see them.

The job RPCs run in process on a real gRPC server over a real loopback socket, behind the real
authentication interceptor (server/auth/) with real API keys of two tenants in a real SQLite
job store, and the real JobService / Operations servicers and job queue; only the job's
stages are small functions (tests/unit/test_job_engine.py's FakePipeline), as the tenancy checks
happen before and around them. Tracking sessions are checked on the real SessionRegistry over
the real store's handoff table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from server.auth.config import AuthConfig
from server.auth.keys import generate_key
from server.auth.layer import AuthLayer, build_auth
from server.auth.principal import ANONYMOUS, DEFAULT_TENANT, SCOPES, Principal
from server.errors import ServiceError
from server.jobs import EventBus
from server.jobs.engine.context import JobContext
from server.jobs.engine.definition import Stage
from server.jobs.engine.queue import JobQueue
from server.jobs.files.uploads import UploadStore, tenant_media_root
from server.jobs.store import ArtifactRecord, JobState, OperationUpdate
from server.jobs.store.sqlite import SqliteJobStore
from server.metrics import Metrics
from server.sam2.samurai import SamuraiConfig
from server.sam2.session import dump_session
from server.sam2.session_registry import SessionRegistry, UnknownSession
from server.servicers.jobs import JobServicer
from server.servicers.operations import OperationsServicer
from server.servicers.tenancy import media_root, upload_fields
from server.wiring.grpc_server import server_interceptors
from tests.conftest import (
    ASSETS,
    SHARED_MEMORY_ARGS,
    EmulatorHandle,
    Orchestrator,
    TritonProcess,
    create_api_key,
    job_args,
    serving_orchestrator,
    stop_process,
)
from tests.unit.test_job_engine import DECODING, SEGMENT, environment, wait_done

ACME, GLOBEX = "acme", "globex"
UNKNOWN = "operations/" + "f" * 32
HOLD = "hold"  # the server_path of a job the fixture's stage keeps running
WRITE = "write"  # ... of a job that stores an artifact, overlay.mp4
TIMEOUT_S = 10.0


@dataclass
class Tenant:
    name: str
    metadata: tuple[tuple[str, str], ...]


@dataclass
class Served:
    store: SqliteJobStore
    queue: JobQueue
    storage_root: Path
    media: Path
    jobs: jobs_service_pb2_grpc.JobServiceStub
    operations: operations_pb2_grpc.OperationsStub
    tenants: dict[str, Tenant]
    ran_as: list[tuple[str, str]]  # (tenant of the running job, its server_path)


async def make_key(store: SqliteJobStore, tenant: str) -> Tenant:
    new = generate_key()
    await store.create_api_key(key_id=new.key_id, tenant=tenant, scopes=SCOPES, secret_hash=new.secret_hash, expire_time=None)
    return Tenant(tenant, (("authorization", f"Bearer {new.key}"),))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    ran_as: list[tuple[str, str]] = []
    release = asyncio.Event()

    async def record(ctx: JobContext) -> None:
        if ctx.request.server_path == HOLD:  # type: ignore[attr-defined]
            await release.wait()  # a job kept RUNNING for the test
            return
        if ctx.request.server_path == WRITE:  # type: ignore[attr-defined]
            src = ctx.workdir / "overlay.mp4"
            src.write_bytes(ctx.operation.name.encode() * 40)  # its own bytes: a mix-up would show
            await ctx.add_artifact(src, name="overlay.mp4", kind=jobs_pb2.ARTIFACT_KIND_OVERLAY_MP4, media_type="video/mp4")
            return
        ran_as.append((ctx.operation.tenant, ctx.request.server_path))  # type: ignore[attr-defined]

    media = tmp_path / "media"
    async with environment(tmp_path) as env:
        queue = env.queue(Stage(DECODING, record), concurrency=4)
        await queue.start()
        tenants = {t: await make_key(env.store, t) for t in (DEFAULT_TENANT, ACME, GLOBEX)}
        metrics = Metrics(CollectorRegistry())
        auth: AuthLayer = await build_auth(AuthConfig(mode="required"), env.store, metrics)
        observability, _chain = server_interceptors(metrics)
        server = grpc.aio.server(interceptors=[observability, auth.interceptor])
        uploads = UploadStore(env.storage, max_bytes=1 << 20)
        jobs_service_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(queue, queue.bus, uploads, env.storage, media_root=media), server
        )
        operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(queue, queue.bus), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield Served(
                env.store,
                queue,
                env.storage.root,
                media,
                jobs_service_pb2_grpc.JobServiceStub(channel),
                operations_pb2_grpc.OperationsStub(channel),
                tenants,
                ran_as,
            )
        finally:
            release.set()
            await channel.close()
            await server.stop(grace=None)
            await auth.close()


async def refused(call) -> grpc.aio.AioRpcError:  # noqa: ANN001 - an awaitable or a stream call
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    return raised.value


def unnamed(message: str, *names: str) -> str:
    for name in names:
        message = message.replace(name, "NAME")
    return message


def held_request() -> bytes:
    return jobs_pb2.SegmentVideoRequest(server_path=HOLD).SerializeToString()


async def finished_with_artifact(s: Served, tenant: str) -> tuple[str, bytes]:
    """A SUCCEEDED operation of ``tenant`` with one artifact, stored by its job."""
    request = jobs_pb2.SegmentVideoRequest(server_path=WRITE).SerializeToString()
    op, _ = await s.store.create_operation(kind=SEGMENT, request=request, tenant=tenant)
    record, _events = await wait_done(s.queue, op.name)
    assert record.state == JobState.SUCCEEDED, record.error
    return op.name, op.name.encode() * 40


async def upload(s: Served, tenant: str, data: bytes, kind: int = jobs_pb2.FILE_KIND_VIDEO) -> str:
    header = jobs_pb2.UploadHeader(kind=kind, filename="clip", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    messages = [jobs_pb2.UploadFileRequest(header=header), jobs_pb2.UploadFileRequest(chunk=data)]
    response = await s.jobs.UploadFile(iter(messages), metadata=s.tenants[tenant].metadata, timeout=TIMEOUT_S)
    return response.upload_id


# ---------------------------------------------------------------------- the real orchestrator


@dataclass
class KeyedServer:
    orchestrator: Orchestrator
    channel: grpc.Channel
    media: Path
    keys: dict[str, tuple[tuple[str, str], ...]]  # tenant -> call metadata with its API key


def cli_key(store: Path, tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {create_api_key(store, tenant)}"),)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, did_emulator: EmulatorHandle) -> Iterator[KeyedServer]:
    tmp = tmp_path_factory.mktemp("tenancy")
    store = tmp / "tenancy-jobs.sqlite3"  # where start_orchestrator puts the job store of "tenancy"
    keys = {tenant: cli_key(store, tenant) for tenant in (DEFAULT_TENANT, GLOBEX)}
    media = tmp / "media"
    (media / DEFAULT_TENANT).mkdir(parents=True)
    (media / GLOBEX).mkdir()
    shutil.copy(ASSETS / "videos" / "bedroom.mp4", media / DEFAULT_TENANT / "bedroom.mp4")
    args = [a for a in job_args(did_emulator)]
    args[args.index("--media-root") + 1] = str(media)
    orch = serving_orchestrator(
        tmp, ["--triton-url", triton.url, *SHARED_MEMORY_ARGS, "--auth", "required", *args], name="tenancy"
    )
    try:
        with grpc.insecure_channel(orch.address) as channel:
            yield KeyedServer(orch, channel, media, keys)
    finally:
        stop_process(orch.process)


def test_real_server_a_tracking_session_is_its_tenants_alone(keyed: KeyedServer) -> None:
    from framewise.v1 import tracking_service_pb2 as pb
    from framewise.v1 import tracking_service_pb2_grpc

    stub = tracking_service_pb2_grpc.TrackingServiceStub(keyed.channel)
    owner, other = keyed.keys[DEFAULT_TENANT], keyed.keys[GLOBEX]
    key = f"tenancy-{uuid.uuid4().hex}"

    def track(open_: pb.OpenSession, metadata: tuple[tuple[str, str], ...]) -> list[pb.TrackResponse]:
        return list(stub.Track(iter([pb.TrackRequest(open=open_)]), metadata=metadata, timeout=60))

    opened = track(pb.OpenSession(session_key=key, keep_on_close=True), owner)
    assert opened[0].session.session_id == key
    with pytest.raises(grpc.RpcError) as foreign:
        track(pb.OpenSession(resume_session_id=key), other)
    with pytest.raises(grpc.RpcError) as unknown:
        track(pb.OpenSession(resume_session_id="tenancy-never-opened"), other)
    assert foreign.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert unnamed(foreign.value.details(), key) == unnamed(unknown.value.details(), "tenancy-never-opened")
    # The owner resumes it; /metrics names no session.
    assert track(pb.OpenSession(resume_session_id=key), owner)[0].session.resumed
    import httpx

    text = httpx.get(keyed.orchestrator.metrics_url, timeout=10).text
    assert key not in text and "session=" not in text and GLOBEX not in text
    assert "cross-tenant attempt" in keyed.orchestrator.log_text()


def test_real_server_jobs_and_uploads_are_their_tenants_alone(keyed: KeyedServer) -> None:
    jobs = jobs_service_pb2_grpc.JobServiceStub(keyed.channel)
    ops = operations_pb2_grpc.OperationsStub(keyed.channel)
    owner, other = keyed.keys[DEFAULT_TENANT], keyed.keys[GLOBEX]
    request = jobs_pb2.SegmentVideoRequest(
        server_path="bedroom.mp4", box={"x1": 100, "y1": 100, "x2": 300, "y2": 300}, max_frames=2
    )
    op = jobs.SegmentVideo(request, metadata=owner, timeout=60)
    with pytest.raises(grpc.RpcError) as elsewhere:  # the file is in the owner's folder only
        jobs.SegmentVideo(request, metadata=other, timeout=60)
    assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND
    for call in (
        lambda name: ops.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=other, timeout=10),
        lambda name: ops.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=other, timeout=10),
        lambda name: list(jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), metadata=other, timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as foreign:
            call(op.name)
        with pytest.raises(grpc.RpcError) as unknown:
            call(UNKNOWN)
        assert foreign.value.code() == unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert unnamed(foreign.value.details(), op.name) == unnamed(unknown.value.details(), UNKNOWN)
    listed = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), metadata=other, timeout=10)
    assert op.name not in [o.name for o in listed.operations]
    mine = ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations"), metadata=owner, timeout=10)
    assert op.name in [o.name for o in mine.operations]
    done = ops.WaitOperation(operations_pb2.WaitOperationRequest(name=op.name), metadata=owner, timeout=120)
    assert done.done and not done.HasField("error"), done.error
    # GLOBEX's storage share holds none of the owner's files.
    theirs = jobs.GetStorageStats(jobs_pb2.GetStorageStatsRequest(), metadata=other, timeout=10)
    assert all(t.files == 0 for t in theirs.tiers)
    ours = jobs.GetStorageStats(jobs_pb2.GetStorageStatsRequest(), metadata=owner, timeout=10)
    assert {t.tier: t.files > 0 for t in ours.tiers}["videos"]


# ---------------------------------------------------------------------- operations


async def test_another_tenants_operation_is_not_found_exactly_like_an_unknown_name(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    s = served
    running, _ = await s.store.create_operation(kind=SEGMENT, request=held_request(), tenant=ACME)
    done, _data = await finished_with_artifact(s, ACME)
    globex = s.tenants[GLOBEX].metadata
    o, j = s.operations, s.jobs

    def calls(name: str) -> dict[str, object]:
        return {
            "GetOperation": o.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=globex, timeout=TIMEOUT_S),
            "WaitOperation": o.WaitOperation(operations_pb2.WaitOperationRequest(name=name), metadata=globex, timeout=TIMEOUT_S),
            "CancelOperation": o.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=globex, timeout=TIMEOUT_S),
            "DeleteOperation": o.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), metadata=globex, timeout=TIMEOUT_S),
            "WatchOperation": j.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), metadata=globex, timeout=TIMEOUT_S),
            "DownloadArtifact": j.DownloadArtifact(
                jobs_pb2.DownloadArtifactRequest(name=name, artifact="overlay.mp4"), metadata=globex, timeout=TIMEOUT_S
            ),
        }

    caplog.set_level(logging.WARNING, logger="server.audit")
    for target in (running.name, done):
        theirs, unknown = calls(target), calls(UNKNOWN)
        for method in theirs:
            foreign, missing = await refused(theirs[method]), await refused(unknown[method])
            assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND, (method, foreign.details())
            # Word for word the unknown name's message (the name the caller sent aside).
            assert unnamed(foreign.details(), target) == unnamed(missing.details(), UNKNOWN), method
            assert ACME not in foreign.details()
    # Each attempt on an existing operation of another tenant left one audit line.
    audited = [r for r in caplog.records if r.name == "server.audit" and getattr(r, "event", "") == "cross_tenant"]
    assert len(audited) == 2 * 6 and {r.tenant for r in audited} == {GLOBEX}  # type: ignore[attr-defined]
    assert {r.resource for r in audited} == {running.name, done}  # type: ignore[attr-defined]

    # Nothing of ACME's changed: not cancelled, not deleted, still downloadable by ACME.
    assert not (await s.store.get_operation(running.name)).cancel_requested
    acme = s.tenants[ACME].metadata
    chunks = [m async for m in j.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(name=done, artifact="overlay.mp4"), metadata=acme)]
    assert b"".join(c.data for c in chunks) == _data
    await o.CancelOperation(operations_pb2.CancelOperationRequest(name=running.name), metadata=acme, timeout=TIMEOUT_S)
    await o.DeleteOperation(operations_pb2.DeleteOperationRequest(name=done), metadata=acme, timeout=TIMEOUT_S)


async def test_list_shows_only_the_callers_operations_and_tokens_stay_its_own(served: Served) -> None:
    s = served
    acme = [(await s.store.create_operation(kind=SEGMENT, request=held_request(), tenant=ACME))[0].name for _ in range(3)]
    globex = [(await s.store.create_operation(kind=SEGMENT, request=held_request(), tenant=GLOBEX))[0].name for _ in range(2)]

    async def listing(tenant: str, **kw: object) -> operations_pb2.ListOperationsResponse:
        request = operations_pb2.ListOperationsRequest(name="operations", **kw)  # type: ignore[arg-type]
        return await s.operations.ListOperations(request, metadata=s.tenants[tenant].metadata, timeout=TIMEOUT_S)

    first = await listing(ACME, page_size=2)
    rest = await listing(ACME, page_size=2, page_token=first.next_page_token)
    assert [op.name for op in [*first.operations, *rest.operations]] == acme and not rest.next_page_token
    assert [op.name for op in (await listing(GLOBEX)).operations] == globex
    assert (await listing(DEFAULT_TENANT)).operations == []
    # ACME's page token continues nothing for GLOBEX.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await listing(GLOBEX, page_size=2, page_token=first.next_page_token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ACME not in err.value.details()


# ---------------------------------------------------------------------- uploads and media


async def test_another_tenants_upload_is_not_found_in_a_submit(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    s = served
    theirs = await upload(s, ACME, b"acme video bytes")
    caplog.set_level(logging.WARNING, logger="server.audit")

    async def submit(upload_id: str) -> grpc.aio.AioRpcError:
        request = jobs_pb2.SegmentVideoRequest(upload_id=upload_id)
        return await refused(s.jobs.SegmentVideo(request, metadata=s.tenants[DEFAULT_TENANT].metadata, timeout=TIMEOUT_S))

    foreign, missing = await submit(theirs), await submit("e" * 32)
    assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert unnamed(foreign.details(), theirs) == unnamed(missing.details(), "e" * 32)
    assert [r.resource for r in caplog.records if getattr(r, "event", "") == "cross_tenant"] == [f"uploads/{theirs}"]  # type: ignore[attr-defined]
    # A talking video names its uploads in other fields, a nested one included: each is checked.
    image = jobs_pb2.CreateTalkingVideoRequest(image_upload_id=theirs)
    background = jobs_pb2.CreateTalkingVideoRequest(background={"image_upload_id": theirs})
    for request, field in ((image, "image_upload_id"), (background, "background.image_upload_id")):
        err = await refused(s.jobs.CreateTalkingVideo(request, metadata=s.tenants[GLOBEX].metadata, timeout=TIMEOUT_S))
        assert err.code() == grpc.StatusCode.NOT_FOUND and field in str(err.trailing_metadata())
    assert await s.store.list_operations() == ([], "")  # nothing was queued


async def test_own_upload_is_accepted_and_the_job_runs_as_its_tenant(served: Served) -> None:
    s = served
    mine = await upload(s, DEFAULT_TENANT, b"default video bytes")
    op = await s.jobs.SegmentVideo(
        jobs_pb2.SegmentVideoRequest(upload_id=mine), metadata=s.tenants[DEFAULT_TENANT].metadata, timeout=TIMEOUT_S
    )
    record, _events = await wait_done(s.queue, op.name)
    assert record.state == JobState.SUCCEEDED and record.tenant == DEFAULT_TENANT
    assert s.ran_as == [(DEFAULT_TENANT, "")]


async def test_server_paths_resolve_under_the_tenants_media_folder(served: Served) -> None:
    s = served
    (s.media / DEFAULT_TENANT).mkdir(parents=True)
    (s.media / GLOBEX).mkdir()
    (s.media / DEFAULT_TENANT / "clip.mp4").write_bytes(b"default's clip")
    (s.media / "shared.mp4").write_bytes(b"at the media root itself")
    os.symlink(s.media / DEFAULT_TENANT / "clip.mp4", s.media / GLOBEX / "borrowed.mp4")
    default, globex = s.tenants[DEFAULT_TENANT].metadata, s.tenants[GLOBEX].metadata

    def segment(path: str, metadata: tuple[tuple[str, str], ...]):  # noqa: ANN202
        return s.jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path=path), metadata=metadata, timeout=TIMEOUT_S)

    op = await segment("clip.mp4", default)
    await wait_done(s.queue, op.name)
    # The job reads <media root>/<tenant>/clip.mp4: the path it was handed names the folder.
    assert s.ran_as == [(DEFAULT_TENANT, f"{DEFAULT_TENANT}/clip.mp4")]
    for path, code in (
        ("clip.mp4", grpc.StatusCode.NOT_FOUND),  # the other tenant's file is not in its folder
        ("../default/clip.mp4", grpc.StatusCode.INVALID_ARGUMENT),
        ("borrowed.mp4", grpc.StatusCode.INVALID_ARGUMENT),  # a symlink out of the folder
        ("../shared.mp4", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        err = await refused(segment(path, globex))
        assert err.code() == code, (path, err.details())
        assert str(s.media) not in err.details()  # the caller's path only, never where it led
    # A file directly under the media root is nobody's once callers authenticate.
    assert (await refused(segment("shared.mp4", default))).code() == grpc.StatusCode.NOT_FOUND
    assert len(s.ran_as) == 1


def test_the_media_root_is_per_tenant_only_once_callers_authenticate(tmp_path: Path) -> None:
    assert media_root(tmp_path, ANONYMOUS) == tmp_path  # authentication off: as it always was
    assert media_root(None, ANONYMOUS) is None
    keyed = Principal(tenant=ACME, subject="k1", scopes=frozenset(SCOPES), via="api_key")
    assert media_root(tmp_path, keyed) == tmp_path / ACME
    assert tenant_media_root(tmp_path, DEFAULT_TENANT, authenticated=True) == tmp_path / DEFAULT_TENANT
    for bad in ("..", ".", "a/b", "", "x" * 200):
        with pytest.raises(Exception, match="not available to this tenant"):
            tenant_media_root(tmp_path, bad, authenticated=True)


def test_upload_fields_finds_every_upload_a_request_names() -> None:
    request = jobs_pb2.CreateTalkingVideoRequest(image_upload_id="a" * 32, audio_upload_id="b" * 32, background={"image_upload_id": "c" * 32})
    assert sorted(upload_fields(request)) == [
        ("audio_upload_id", "b" * 32), ("background.image_upload_id", "c" * 32), ("image_upload_id", "a" * 32)
    ]  # fmt: skip
    assert list(upload_fields(jobs_pb2.SegmentVideoRequest(server_path="x.mp4"))) == []


async def test_storage_stats_count_the_callers_share(served: Served) -> None:
    s = served
    acme_upload = await upload(s, ACME, b"a" * 5000)
    globex_upload = await upload(s, GLOBEX, b"g" * 300)
    acme_done, acme_bytes = await finished_with_artifact(s, ACME)

    async def tiers(tenant: str) -> dict[str, tuple[int, int]]:
        stats = await s.jobs.GetStorageStats(jobs_pb2.GetStorageStatsRequest(), metadata=s.tenants[tenant].metadata, timeout=TIMEOUT_S)
        return {t.tier: (t.files, t.bytes) for t in stats.tiers}

    def on_disk(folder: Path) -> tuple[int, int]:
        files = [p for p in folder.rglob("*") if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)

    acme, globex = await tiers(ACME), await tiers(GLOBEX)
    assert acme["uploads"] == on_disk(s.storage_root / "uploads" / acme_upload)
    assert acme["videos"] == (1, len(acme_bytes))
    assert globex["uploads"] == on_disk(s.storage_root / "uploads" / globex_upload)
    assert globex["videos"] == (0, 0) and globex["processed"] == (0, 0)
    assert acme["uploads"][1] > 5000 > globex["uploads"][1]
    assert await tiers(DEFAULT_TENANT) == {"uploads": (0, 0), "processed": (0, 0), "videos": (0, 0), "temp": (0, 0)}
    assert acme_done  # (kept: its folder is what the videos tier counted)


# ---------------------------------------------------------------------- submits per tenant


async def test_request_ids_are_per_tenant_and_each_job_runs_as_its_tenant(served: Served) -> None:
    s = served
    (s.media / ACME).mkdir(parents=True)
    (s.media / GLOBEX).mkdir()
    (s.media / ACME / "a.mp4").write_bytes(b"a")
    (s.media / GLOBEX / "g.mp4").write_bytes(b"g")

    async def submit(tenant: str, path: str) -> str:
        request = jobs_pb2.SegmentVideoRequest(server_path=path, request_id="same-key")
        op = await s.jobs.SegmentVideo(request, metadata=s.tenants[tenant].metadata, timeout=TIMEOUT_S)
        return op.name

    a, g = await submit(ACME, "a.mp4"), await submit(GLOBEX, "g.mp4")
    assert a != g and await submit(ACME, "a.mp4") == a  # a repeat within the tenant: the same job
    for name, tenant in ((a, ACME), (g, GLOBEX)):
        record, _ = await wait_done(s.queue, name)
        assert record.tenant == tenant and record.state == JobState.SUCCEEDED
    assert sorted(s.ran_as) == [(ACME, "acme/a.mp4"), (GLOBEX, "globex/g.mp4")]


# ---------------------------------------------------------------------- the store's migration


async def test_rows_written_before_tenancy_belong_to_the_default_tenant(tmp_path: Path) -> None:
    import sqlite3

    from tests.unit.test_job_store import _V1_SCHEMA

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.close()
    async with SqliteJobStore(path) as store:
        old = await store.get_operation("operations/running")
        assert old.tenant == DEFAULT_TENANT and old.request_id == "idem"
        assert (await store.find_request("idem", old.kind)) == old  # still the default tenant's key
        assert await store.find_request("idem", old.kind, tenant=ACME) is None
        theirs, created = await store.create_operation(kind=old.kind, request=b"r", request_id="idem", tenant=ACME)
        assert created and theirs.name != old.name
        again, created = await store.create_operation(kind=old.kind, request=b"r", request_id="idem")
        assert not created and again.name == old.name


# ---------------------------------------------------------------------- tracking sessions


def registry(store: SqliteJobStore | None, name: str = "replica-a") -> SessionRegistry:
    return SessionRegistry(Metrics(CollectorRegistry()), max_sessions=4, idle_ttl_s=60, replica_id=name, handoff=store)


async def test_a_tracking_session_is_resumed_only_by_its_tenant(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        here = registry(store)
        mine = here.open(SamuraiConfig(), "shared-key", tenant=ACME)
        theirs = here.open(SamuraiConfig(), "shared-key", tenant=GLOBEX)  # the same key: no clash, no leak
        assert mine is not theirs
        for session in (mine, theirs):
            here.detach(session, keep=True)

        with pytest.raises(UnknownSession) as foreign:
            await here.resume("shared-key", tenant="initech")
        with pytest.raises(UnknownSession) as unknown:
            await here.resume("never-opened", tenant="initech")
        assert foreign.value.code == unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert unnamed(foreign.value.message, "shared-key") == unnamed(unknown.value.message, "never-opened")
        assert foreign.value.other_tenant and not unknown.value.other_tenant
        assert await here.resume("shared-key", tenant=ACME) is mine

        # Handed off by a draining replica: still the tenant's own, in the store too.
        mine.next_frame_index = 3
        here.detach(mine, keep=True)
        expected = dump_session(mine)
        await here.drain(timeout_s=5)
        there = registry(store, "replica-b")
        with pytest.raises(UnknownSession) as elsewhere:
            await there.resume("shared-key", tenant="initech")
        assert elsewhere.value.code == grpc.StatusCode.NOT_FOUND
        restored = await there.resume("shared-key", tenant=ACME)
        assert restored.tenant == ACME and dump_session(restored) == expected
        assert (await there.resume("shared-key", tenant=GLOBEX)).tenant == GLOBEX


async def test_the_tracking_servicer_passes_the_callers_tenant_and_audits_a_foreign_resume(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from framewise.v1 import tracking_service_pb2
    from server.auth.principal import bind_principal, unbind_principal
    from server.servicers.tracking import TrackingServicer

    sessions = registry(None)
    held = sessions.open(SamuraiConfig(), "k-1", tenant=ACME)
    sessions.detach(held, keep=True)
    servicer = TrackingServicer(None, sessions, sessions.metrics, frame_timeout_s=1.0)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="server.audit")
    token = bind_principal(Principal(tenant=GLOBEX, subject="k-globex", scopes=frozenset(SCOPES), via="api_key"))
    try:
        with pytest.raises(ServiceError) as err:
            await servicer._open(tracking_service_pb2.OpenSession(resume_session_id="k-1"), None)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        # Opening the same key is no clash either: it is GLOBEX's own session.
        opened = await servicer._open(tracking_service_pb2.OpenSession(session_key="k-1"), None)
        assert opened.tenant == GLOBEX and opened is not held
    finally:
        unbind_principal(token)
    assert [getattr(r, "resource", "") for r in caplog.records if getattr(r, "event", "") == "cross_tenant"] == ["sessions/k-1"]
    assert (await sessions.resume("k-1", tenant=ACME)) is held


# ---------------------------------------------------------------------- metrics


def test_no_metric_is_labelled_with_a_session_operation_or_tenant() -> None:
    metrics = Metrics(CollectorRegistry())
    sessions = SessionRegistry(metrics, max_sessions=4, idle_ttl_s=60)
    sessions.open(SamuraiConfig(), "session-key-1", tenant=ACME)
    labels = {label for family in metrics.registry.collect() for s in family.samples for label in s.labels}
    declared = {
        name
        for collector in list(metrics.registry._collector_to_names)  # every metric, whether it has samples yet
        for name in getattr(collector, "_labelnames", ())
    }
    assert not (labels | declared) & {"session", "session_id", "operation", "name", "tenant", "key_id", "upload"}
    text = generate_latest(metrics.registry).decode()
    assert "session-key-1" not in text and ACME not in text
    assert re.search(r"^framewise_tracking_session_bytes 0\.0$", text, re.MULTILINE)
