"""Attacks on capacity: a tenant that exhausts a quota (its call rate, tracking sessions, jobs,
storage) is refused RESOURCE_EXHAUSTED with google.rpc.QuotaFailure naming the quota and
RetryInfo, another tenant is served meanwhile, and the quota comes back (recovery). The limits
are per-tenant overrides set with `framewise admin quotas set` (tests/e2e/attacks/conftest.py), over
the real server with real keys and TLS.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from PIL import Image

from framewise.v1 import common_pb2, jobs_service_pb2_grpc, tracking_service_pb2_grpc, vision_service_pb2, vision_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import tracking_service_pb2 as track_pb2
from tests.conftest import ASSETS, wait_until
from tests.e2e.attacks.secure_server import QUOTA_REFRESH_S, SecureServer, admin, assert_serves, quota_details, refusal

BOX = common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def channel(secure: SecureServer) -> grpc.Channel:
    return secure.channel()


def _assert_quota(error: grpc.RpcError, subject: str) -> float:
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    subjects, delay = quota_details(error)
    assert subject in subjects, (subjects, error.details())
    assert delay is not None and delay > 0, delay
    return delay


def test_a_call_rate_flood_is_refused_then_recovers(secure: SecureServer, channel: grpc.Channel) -> None:
    vision = vision_service_pb2_grpc.VisionServiceStub(channel)
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=_jpeg()))
    me = secure.as_key("quota-rate")
    error = None
    for _ in range(6):  # a burst of 2, refilled at 0.5/s: the bucket runs dry within these
        try:
            vision.Detect(request, metadata=me, timeout=60)
        except grpc.RpcError as exc:
            error = exc
            break
    assert error is not None, "six Detects in a row were all served at a rate quota of 0.5/s, burst 2"
    delay = _assert_quota(error, "rate.vision")
    # Another tenant is served meanwhile.
    vision.Detect(request, metadata=secure.as_key("acme"), timeout=60)
    time.sleep(delay + 0.1)
    vision.Detect(request, metadata=me, timeout=60)  # recovered
    assert_serves(secure, channel)


def _held_session(tracking: tracking_service_pb2_grpc.TrackingServiceStub, metadata, release: threading.Event):  # noqa: ANN001, ANN202
    """A Track stream that opens a session and sends nothing more until ``release`` is set."""

    def requests() -> Iterator[track_pb2.TrackRequest]:
        yield track_pb2.TrackRequest(open=track_pb2.OpenSession())
        release.wait(120)

    stream = tracking.Track(requests(), metadata=metadata, timeout=120)
    return stream, next(stream).session


def test_a_tenant_at_its_session_quota_is_refused_and_others_are_not(secure: SecureServer, channel: grpc.Channel) -> None:
    tracking = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    me = secure.as_key("quota-sessions")
    release = threading.Event()
    stream, opened = _held_session(tracking, me, release)
    try:
        assert opened.session_id
        error = refusal(lambda: list(tracking.Track(iter([track_pb2.TrackRequest(open=track_pb2.OpenSession())]), metadata=me, timeout=30)))
        _assert_quota(error, "sessions")
        # acme opens one while quota-sessions is at its quota.
        other = list(tracking.Track(iter([track_pb2.TrackRequest(open=track_pb2.OpenSession())]), metadata=secure.as_key("acme"), timeout=30))
        assert other[0].session.session_id
    finally:
        release.set()
        stream.cancel()

    def opens() -> bool:
        try:
            list(tracking.Track(iter([track_pb2.TrackRequest(open=track_pb2.OpenSession())]), metadata=me, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
            return False
        return True

    wait_until(opens, 30, "the closed session's slot to come back", interval_s=0.3)
    assert_serves(secure, channel)


def _state(operations: operations_pb2_grpc.OperationsStub, name: str, metadata) -> int:  # noqa: ANN001
    op = operations.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=metadata, timeout=10)
    meta = jobs_pb2.JobMetadata()
    assert op.metadata.Unpack(meta)
    return meta.state


def test_a_tenant_at_its_job_quota_is_refused_then_recovers(secure: SecureServer, channel: grpc.Channel) -> None:
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    operations = operations_pb2_grpc.OperationsStub(channel)
    me = secure.as_key("quota-jobs")
    long_job = jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX), metadata=me, timeout=60)
    short = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=1)
    try:
        _assert_quota(refusal(lambda: jobs.SegmentVideo(short, metadata=me, timeout=60)), "jobs")
        # Another tenant's submit is accepted meanwhile.
        theirs = jobs.SegmentVideo(short, metadata=secure.as_key("acme"), timeout=60)
    finally:
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=long_job.name), metadata=me, timeout=30)
    wait_until(lambda: _state(operations, long_job.name, me) == jobs_pb2.JOB_STATE_CANCELLED, 120, "the long job to end")
    after = jobs.SegmentVideo(short, metadata=me, timeout=60)  # recovered
    for name, key in ((after.name, me), (theirs.name, secure.as_key("acme"))):
        wait_until(lambda n=name, k=key: _state(operations, n, k) == jobs_pb2.JOB_STATE_SUCCEEDED, 120, f"{name} to succeed")
    assert_serves(secure, channel)


def _upload(jobs: jobs_service_pb2_grpc.JobServiceStub, data: bytes, metadata) -> jobs_pb2.UploadFileResponse:  # noqa: ANN001
    header = jobs_pb2.UploadHeader(kind=jobs_pb2.FILE_KIND_IMAGE, filename="p.jpg", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    messages = [jobs_pb2.UploadFileRequest(header=header)]
    messages += [jobs_pb2.UploadFileRequest(chunk=data[i : i + 65536]) for i in range(0, len(data), 65536)]
    return jobs.UploadFile(iter(messages), metadata=metadata, timeout=60)


def test_a_tenant_over_its_storage_quota_is_refused_then_recovers(secure: SecureServer, channel: grpc.Channel) -> None:
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    me = secure.as_key("quota-storage")
    image = (ASSETS / "images" / "person.jpg").read_bytes()  # 114 kB of a 150 kB quota
    _upload(jobs, image, me)
    time.sleep(QUOTA_REFRESH_S + 0.3)  # the server measures a tenant's storage at most this often
    _assert_quota(refusal(lambda: _upload(jobs, image, me)), "storage_bytes")
    _upload(jobs, image, secure.as_key("acme"))  # another tenant uploads meanwhile
    admin(secure.store, "quotas", "set", "--tenant", "quota-storage", "--clear", "storage_bytes")

    def uploads() -> bool:
        try:
            _upload(jobs, image, me)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (exc.code(), exc.details())
            return False
        return True

    wait_until(uploads, 30, "the raised quota to reach the server", interval_s=0.3)
    assert_serves(secure, channel)
