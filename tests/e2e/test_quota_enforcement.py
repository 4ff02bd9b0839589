"""Per-tenant quotas enforced by the real orchestrator, over real sockets, with a real Triton:
exhaustion answers RESOURCE_EXHAUSTED with google.rpc.QuotaFailure and RetryInfo, the quota
comes back, and one tenant at its session or job quota leaves room for another tenant where the
server's global bound alone would have let the first take it all.

Every tenant calls with its own API key (``authorization: Bearer``; the server runs with
``--auth required``), created in the job store before the server starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from PIL import Image

from framewise.v1 import common_pb2, jobs_service_pb2, jobs_service_pb2_grpc, vision_service_pb2, vision_service_pb2_grpc
from framewise.v1 import tracking_service_pb2 as pb
from framewise.v1 import tracking_service_pb2_grpc
from tests.conftest import ASSETS, REPO, free_port, health_status, quota_details, stop_process, wait_until

TENANTS = ("rate-a", "rate-b", "sess-a", "sess-b", "idle-a", "jobs-a", "jobs-b", "store-a")
# An override stored before the server starts (`framewise admin quotas set` writes the same row).
STORE_A_BYTES = 1000
MAX_TRACKING_SESSIONS = 3  # the replica's global bound
QUOTA_SESSIONS = 2
QUOTA_JOBS = 2
MAX_QUEUED_JOBS = 3  # waiting jobs, all tenants together
TRACK_IDLE_TIMEOUT_S = 3.0
VISION_RATE, VISION_BURST = 0.2, 2  # a token every 5 s: slow Detects on a busy host cannot refill it


class Server:
    def __init__(self, address: str, process: subprocess.Popen, log: Path, metrics_url: str) -> None:
        self.address, self.process, self.log, self.metrics_url = address, process, log, metrics_url


# tenant -> its API key (filled by the server fixture).
KEYS: dict[str, str] = {}


async def _create_keys(store_path: Path) -> None:
    from server.auth.keys import generate_key
    from server.jobs.store.sqlite import SqliteJobStore

    async with SqliteJobStore(store_path) as store:
        for tenant in TENANTS:
            new = generate_key()
            await store.create_api_key(
                key_id=new.key_id, tenant=tenant, scopes=("vision", "tracking", "jobs:read", "jobs:write"),
                secret_hash=new.secret_hash, expire_time=None,
            )  # fmt: skip
            KEYS[tenant] = new.key
        await store.set_tenant_quotas("store-a", {"storage_bytes": STORE_A_BYTES})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, triton) -> Iterator[Server]:  # noqa: ANN001
    tmp = tmp_path_factory.mktemp("quotas")
    # An authenticated tenant's server_path resolves under <media root>/<tenant>/.
    for tenant in ("jobs-a", "jobs-b"):
        (tmp / "media" / tenant).mkdir(parents=True)
        shutil.copy(ASSETS / "videos" / "bedroom.mp4", tmp / "media" / tenant / "bedroom.mp4")
    asyncio.run(_create_keys(tmp / "jobs.sqlite3"))
    port, metrics_port = free_port(), free_port()
    log = tmp / "orchestrator.log"
    command = [
        sys.executable, "-m", "server", "--auth", "required",
        "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--triton-url", triton.url, "--health-interval", "0.2", "--log-level", "DEBUG",
        "--job-store", str(tmp / "jobs.sqlite3"), "--storage-root", str(tmp / "storage"),
        "--media-root", str(tmp / "media"), "--result-cache-bytes", "0",
        "--job-concurrency", "1", "--max-queued-jobs", str(MAX_QUEUED_JOBS),
        "--max-tracking-sessions", str(MAX_TRACKING_SESSIONS), "--session-idle-ttl", "30",
        "--quota-sessions", str(QUOTA_SESSIONS), "--quota-jobs", str(QUOTA_JOBS),
        "--quota-rate-vision", str(VISION_RATE), "--quota-burst-vision", str(VISION_BURST),
        "--track-idle-timeout", str(TRACK_IDLE_TIMEOUT_S), "--quota-session-renew", "1",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"127.0.0.1:{port}", process, log, f"http://127.0.0.1:{metrics_port}/metrics")
    try:
        with grpc.insecure_channel(srv.address) as channel:
            wait_until(lambda: process.poll() is None and health_status(channel) == 1, 90, "the orchestrator to serve")
    except AssertionError:
        stop_process(process)
        raise AssertionError(f"orchestrator never served; log:\n{log.read_text()[-4000:]}") from None
    yield srv
    stop_process(process)


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def as_tenant(tenant: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {KEYS[tenant]}")]



def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_an_exhausted_rate_is_refused_with_quota_failure_and_retry_info_then_recovers(channel: grpc.Channel, server: Server) -> None:
    vision = vision_service_pb2_grpc.VisionServiceStub(channel)
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=_jpeg()))
    for _ in range(VISION_BURST):
        vision.Detect(request, metadata=as_tenant("rate-a"), timeout=60)
    with pytest.raises(grpc.RpcError) as refused:
        vision.Detect(request, metadata=as_tenant("rate-a"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "quota rate.vision exceeded" in refused.value.details()
    assert f"{VISION_RATE:g} vision calls per second" in refused.value.details()
    subjects, delay = quota_details(refused.value)
    assert subjects == ["rate.vision"]
    assert delay is not None and 0 < delay <= 1 / VISION_RATE
    # Counted by quota name, never by tenant.
    counted = re.search(r'^framewise_quota_refusals_total\{quota="rate.vision"\} (\S+)', httpx.get(server.metrics_url, timeout=5).text, re.M)
    assert counted is not None and float(counted.group(1)) >= 1
    # Another tenant's bucket is its own.
    vision.Detect(request, metadata=as_tenant("rate-b"), timeout=60)
    # After the delay RetryInfo gave, the tenant's call goes through again.
    time.sleep(delay + 0.05)
    vision.Detect(request, metadata=as_tenant("rate-a"), timeout=60)


class HeldStream:
    """A Track stream that sent only its `open` and stays open until closed."""

    def __init__(self, stub: tracking_service_pb2_grpc.TrackingServiceStub, tenant: str) -> None:
        self._release = threading.Event()

        def requests() -> Iterator[pb.TrackRequest]:
            yield pb.TrackRequest(open=pb.OpenSession())
            self._release.wait(60)

        self.call = stub.Track(requests(), metadata=as_tenant(tenant), timeout=60)

    def opened(self) -> str:
        return next(self.call).session.session_id

    def close(self) -> None:
        self._release.set()
        list(self.call)

    def abandon(self) -> None:
        """For a stream the server refused: stop its request generator."""
        self._release.set()
        self.call.cancel()


def open_when_free(stub: tracking_service_pb2_grpc.TrackingServiceStub, tenant: str, timeout_s: float = 5) -> HeldStream:
    """A held stream of ``tenant``, retried while its quota refuses it: a stream's slot is freed
    in the background right after the stream ends, so it may lag the client's view by a moment."""
    deadline = time.monotonic() + timeout_s
    while True:
        stream = HeldStream(stub, tenant)
        try:
            stream.opened()
            return stream
        except grpc.RpcError as exc:
            stream.abandon()
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, exc.details()
            time.sleep(0.2)


def test_a_tenant_at_its_session_quota_leaves_the_replicas_last_session_to_another(channel: grpc.Channel) -> None:
    stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    held = [HeldStream(stub, "sess-a") for _ in range(QUOTA_SESSIONS)]
    try:
        assert len({s.opened() for s in held}) == QUOTA_SESSIONS
        # The replica has room for one more (its bound is 3), but not for this tenant.
        extra = HeldStream(stub, "sess-a")
        with pytest.raises(grpc.RpcError) as refused:
            extra.opened()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"holds {QUOTA_SESSIONS} of its {QUOTA_SESSIONS} tracking sessions" in refused.value.details()
        subjects, delay = quota_details(refused.value)
        assert subjects == ["sessions"] and delay is not None and delay > 0
        # The last session of the replica goes to another tenant.
        other = HeldStream(stub, "sess-b")
        assert other.opened()
        other.close()
        # A closed stream gives its slot back.
        held.pop().close()
        held.append(open_when_free(stub, "sess-a"))
    finally:
        for stream in held:
            stream.close()


def test_a_stream_that_only_opened_is_ended_and_frees_its_session(channel: grpc.Channel) -> None:
    stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    idle = [HeldStream(stub, "idle-a") for _ in range(QUOTA_SESSIONS)]
    for stream in idle:
        stream.opened()
    started = time.monotonic()
    for stream in idle:
        with pytest.raises(grpc.RpcError) as ended:
            list(stream.call)  # the client never sends a frame
        assert ended.value.code() == grpc.StatusCode.ABORTED
        assert "received no message" in ended.value.details() and "was released" in ended.value.details()
    assert time.monotonic() - started < TRACK_IDLE_TIMEOUT_S + 5
    # Both slots are free again: the tenant opens its full quota anew.
    fresh = [open_when_free(stub, "idle-a") for _ in range(QUOTA_SESSIONS)]
    for stream in fresh:
        stream.close()


def _segment(jobs: jobs_service_pb2_grpc.JobServiceStub, tenant: str) -> str:
    request = jobs_service_pb2.SegmentVideoRequest(
        server_path="bedroom.mp4", box=common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300)
    )
    return jobs.SegmentVideo(request, metadata=as_tenant(tenant), timeout=60).name


def test_a_tenant_at_its_job_quota_leaves_the_queue_to_another(channel: grpc.Channel) -> None:
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    operations = operations_pb2_grpc.OperationsStub(channel)
    submitted = [(_segment(jobs, "jobs-a"), "jobs-a") for _ in range(QUOTA_JOBS)]
    try:
        with pytest.raises(grpc.RpcError) as refused:
            _segment(jobs, "jobs-a")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The tenant's quota refused it, not the global queue (which has room for 3 waiting).
        assert f"has {QUOTA_JOBS} jobs queued or running, its quota is {QUOTA_JOBS}" in refused.value.details()
        subjects, delay = quota_details(refused.value)
        assert subjects == ["jobs"] and delay is not None
        # Another tenant's job is accepted meanwhile.
        submitted.append((_segment(jobs, "jobs-b"), "jobs-b"))
        # Cancelling one of its jobs gives the tenant its slot back once the job has ended.
        first = submitted[0][0]
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=first), metadata=as_tenant("jobs-a"), timeout=30)

        def ended() -> bool:
            op = operations.GetOperation(operations_pb2.GetOperationRequest(name=first), metadata=as_tenant("jobs-a"), timeout=10)
            return op.done

        wait_until(ended, 60, "the cancelled job to end")
        submitted.append((_segment(jobs, "jobs-a"), "jobs-a"))
    finally:
        for name, tenant in submitted:
            try:
                operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=as_tenant(tenant), timeout=30)
            except grpc.RpcError:
                pass


def _upload(jobs: jobs_service_pb2_grpc.JobServiceStub, tenant: str, size: int) -> str:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    header = jobs_service_pb2.UploadHeader(
        kind=jobs_service_pb2.FILE_KIND_VIDEO, filename="clip", size_bytes=size, sha256=hashlib.sha256(data).hexdigest()
    )
    messages = [jobs_service_pb2.UploadFileRequest(header=header), jobs_service_pb2.UploadFileRequest(chunk=data)]
    return jobs.UploadFile(iter(messages), metadata=as_tenant(tenant), timeout=60).upload_id


def test_a_stored_storage_override_refuses_the_upload_that_would_pass_it(channel: grpc.Channel) -> None:
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    assert _upload(jobs, "store-a", 600)
    with pytest.raises(grpc.RpcError) as refused:
        _upload(jobs, "store-a", 600)  # 1200 > 1000, refused on its declared size
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # (What it keeps is the upload's data, plus its small metadata file once the folder is measured.)
    assert f"and this upload adds 600 bytes, its quota is {STORE_A_BYTES} bytes" in refused.value.details()
    subjects, delay = quota_details(refused.value)
    assert subjects == ["storage_bytes"] and delay is not None
    assert _upload(jobs, "store-a", 100)  # what still fits is accepted
    assert _upload(jobs, "rate-a", 5000)  # the default quota of another tenant is far larger
