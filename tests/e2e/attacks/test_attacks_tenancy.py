"""Attacks across tenants: tenant globex's valid credentials (API key, or a JWT) on each of
tenant acme's resources, for every RPC that takes one: its operation (Get, Wait, Watch, Cancel,
Delete, List, DownloadArtifact), its upload used in a submit, its tracking session resumed, its
request_id reused. Each answer is NOT_FOUND with the very message a name that does not exist
gets (existence is not leaked), acme's resource is unchanged afterwards, and the server
answers the next valid call.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from framewise.v1 import common_pb2, jobs_service_pb2_grpc, tracking_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import tracking_service_pb2 as track_pb2
from tests.conftest import ASSETS, wait_until
from tests.e2e.attacks.secure_server import SecureServer, assert_serves, bearer, refusal
from tests.unit.test_did import tone_wav

BOX = common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300)
REQUEST_ID = "acme-request-1"
TIMEOUT_S = 120


@dataclass
class AcmeResources:
    done: str  # a finished operation with artifacts
    artifact: str
    upload_id: str  # an image upload
    upload_bytes: int
    session_id: str  # a tracking session kept for resume


def _crossing_frame(index: int) -> tuple[bytes, common_pb2.BoundingBox]:
    folder = ASSETS / "sequences" / "Crossing"
    data = (folder / "img" / f"{index + 1:04d}.jpg").read_bytes()
    x, y, w, h = (float(v) for v in re.split(r"[\t,]", (folder / "groundtruth_rect.txt").read_text().split("\n")[index].strip()))
    return data, common_pb2.BoundingBox(x1=x, y1=y, x2=x + w, y2=y + h)


def _upload(jobs: jobs_service_pb2_grpc.JobServiceStub, data: bytes, kind: int, metadata) -> jobs_pb2.UploadFileResponse:  # noqa: ANN001
    header = jobs_pb2.UploadHeader(kind=kind, filename="f", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    messages = [jobs_pb2.UploadFileRequest(header=header)]
    messages += [jobs_pb2.UploadFileRequest(chunk=data[i : i + 65536]) for i in range(0, len(data), 65536)]
    return jobs.UploadFile(iter(messages), metadata=metadata, timeout=60)


def _finished(operations: operations_pb2_grpc.OperationsStub, name: str, metadata) -> operations_pb2.Operation:  # noqa: ANN001
    result: list[operations_pb2.Operation] = []

    def done() -> bool:
        op = operations.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=metadata, timeout=10)
        result[:] = [op]
        return op.done

    wait_until(done, TIMEOUT_S, f"{name} to finish", interval_s=0.3)
    return result[0]


@pytest.fixture(scope="module")
def channel(secure: SecureServer) -> grpc.Channel:
    return secure.channel()


@pytest.fixture(scope="module")
def jobs(channel: grpc.Channel) -> jobs_service_pb2_grpc.JobServiceStub:
    return jobs_service_pb2_grpc.JobServiceStub(channel)


@pytest.fixture(scope="module")
def operations(channel: grpc.Channel) -> operations_pb2_grpc.OperationsStub:
    return operations_pb2_grpc.OperationsStub(channel)


@pytest.fixture(scope="module")
def tracking(channel: grpc.Channel) -> tracking_service_pb2_grpc.TrackingServiceStub:
    return tracking_service_pb2_grpc.TrackingServiceStub(channel)


@pytest.fixture(scope="module")
def acme(secure: SecureServer, jobs, operations, tracking) -> AcmeResources:  # noqa: ANN001
    """What tenant acme owns, made with acme's key."""
    me = secure.as_key("acme")
    op = jobs.SegmentVideo(
        jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=2, request_id=REQUEST_ID),
        metadata=me, timeout=60,
    )  # fmt: skip
    image = (ASSETS / "images" / "bus.jpg").read_bytes()
    upload = _upload(jobs, image, jobs_pb2.FILE_KIND_IMAGE, me)
    frame, box = _crossing_frame(0)
    responses = tracking.Track(
        iter([
            track_pb2.TrackRequest(open=track_pb2.OpenSession(keep_on_close=True)),
            track_pb2.TrackRequest(frame=track_pb2.TrackFrame(frame_index=0, image=common_pb2.Image(encoded=frame),
                                                              prompts=[track_pb2.ObjectPrompt(object_id=1, box=box)])),
        ]),
        metadata=me, timeout=TIMEOUT_S,
    )  # fmt: skip
    replies = list(responses)
    assert replies[0].session.session_id and replies[1].frame.frame_index == 0
    done = _finished(operations, op.name, me)
    meta = jobs_pb2.JobMetadata()
    assert done.metadata.Unpack(meta) and meta.state == jobs_pb2.JOB_STATE_SUCCEEDED, done
    return AcmeResources(op.name, "frames.json", upload.upload_id, len(image), replies[0].session.session_id)


def _unknown_operation() -> str:
    return f"operations/{uuid.uuid4().hex}"


def _same_refusal(attempt, unknown, *names: str) -> None:  # noqa: ANN001
    """``attempt`` (another tenant's resource) and ``unknown`` (a name that does not exist) are
    refused with the same code and, their names blanked, the same message."""
    theirs, nobody = refusal(attempt), refusal(unknown)
    assert theirs.code() == grpc.StatusCode.NOT_FOUND, (theirs.code(), theirs.details())
    assert nobody.code() == grpc.StatusCode.NOT_FOUND, (nobody.code(), nobody.details())

    def blank(text: str | None) -> str:
        text = text or ""
        for name in names:
            text = text.replace(name, "NAME")
        return text

    assert blank(theirs.details()) == blank(nobody.details()), (theirs.details(), nobody.details())


def _acme_still_has(operations, secure: SecureServer, name: str) -> operations_pb2.Operation:  # noqa: ANN001
    return operations.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=secure.as_key("acme"), timeout=10)


# -- operations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("credential", ["key", "jwt"])
def test_get_operation_of_another_tenant_is_not_found(secure, operations, channel, acme, credential: str) -> None:  # noqa: ANN001
    them = secure.as_key("globex") if credential == "key" else bearer(secure.issuer.token("globex"))
    unknown = _unknown_operation()
    _same_refusal(
        lambda: operations.GetOperation(operations_pb2.GetOperationRequest(name=acme.done), metadata=them, timeout=10),
        lambda: operations.GetOperation(operations_pb2.GetOperationRequest(name=unknown), metadata=them, timeout=10),
        acme.done, unknown,
    )  # fmt: skip
    assert_serves(secure, channel)


def test_acme_reaches_its_operation_with_a_jwt_as_with_its_key(secure, operations, channel, acme) -> None:  # noqa: ANN001
    """Control: the tenant comes from the credential, whatever its kind."""
    op = operations.GetOperation(operations_pb2.GetOperationRequest(name=acme.done), metadata=bearer(secure.issuer.token("acme")), timeout=10)
    assert op.name == acme.done and op.done
    assert_serves(secure, channel)


def test_wait_operation_of_another_tenant_is_not_found(secure, operations, channel, acme) -> None:  # noqa: ANN001
    them, unknown = secure.as_key("globex"), _unknown_operation()

    def wait(name: str):  # noqa: ANN202
        return lambda: operations.WaitOperation(operations_pb2.WaitOperationRequest(name=name), metadata=them, timeout=10)

    _same_refusal(wait(acme.done), wait(unknown), acme.done, unknown)
    assert_serves(secure, channel)


def test_watch_operation_of_another_tenant_is_not_found(secure, jobs, channel, acme) -> None:  # noqa: ANN001
    them, unknown = secure.as_key("globex"), _unknown_operation()

    def watch(name: str):  # noqa: ANN202
        return lambda: list(jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), metadata=them, timeout=10))

    _same_refusal(watch(acme.done), watch(unknown), acme.done, unknown)
    assert_serves(secure, channel)


def test_download_artifact_of_another_tenant_is_not_found(secure, jobs, channel, acme) -> None:  # noqa: ANN001
    them, unknown = secure.as_key("globex"), _unknown_operation()

    def download(name: str):  # noqa: ANN202
        request = jobs_pb2.DownloadArtifactRequest(name=name, artifact=acme.artifact)
        return lambda: list(jobs.DownloadArtifact(request, metadata=them, timeout=10))

    _same_refusal(download(acme.done), download(unknown), acme.done, unknown)
    # acme downloads it.
    chunks = list(jobs.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(name=acme.done, artifact=acme.artifact), metadata=secure.as_key("acme"), timeout=30))
    assert b"".join(c.data for c in chunks)
    assert_serves(secure, channel)


def test_delete_operation_of_another_tenant_is_not_found_and_deletes_nothing(secure, operations, channel, acme) -> None:  # noqa: ANN001
    them, unknown = secure.as_key("globex"), _unknown_operation()

    def delete(name: str):  # noqa: ANN202
        return lambda: operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), metadata=them, timeout=10)

    _same_refusal(delete(acme.done), delete(unknown), acme.done, unknown)
    assert _acme_still_has(operations, secure, acme.done).done
    assert_serves(secure, channel)


def test_cancel_operation_of_another_tenant_is_not_found_and_the_job_goes_on(secure, jobs, operations, channel) -> None:  # noqa: ANN001
    me, them, unknown = secure.as_key("acme"), secure.as_key("globex"), _unknown_operation()
    running = jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX), metadata=me, timeout=60)
    try:

        def cancel(name: str):  # noqa: ANN202
            return lambda: operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name), metadata=them, timeout=10)

        _same_refusal(cancel(running.name), cancel(unknown), running.name, unknown)
        op = _acme_still_has(operations, secure, running.name)
        meta = jobs_pb2.JobMetadata()
        assert op.metadata.Unpack(meta)
        assert meta.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING), meta
    finally:
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=running.name), metadata=me, timeout=30)
    cancelled = _finished(operations, running.name, me)
    meta = jobs_pb2.JobMetadata()
    assert cancelled.metadata.Unpack(meta) and meta.state == jobs_pb2.JOB_STATE_CANCELLED
    assert_serves(secure, channel)


def test_list_operations_shows_only_ones_own(secure, operations, channel, acme) -> None:  # noqa: ANN001
    def names(key: str, filter_: str = "") -> set[str]:
        listed = operations.ListOperations(operations_pb2.ListOperationsRequest(filter=filter_, page_size=1000), metadata=secure.as_key(key), timeout=10)
        return {op.name for op in listed.operations}

    assert acme.done in names("acme")
    assert acme.done not in names("globex")
    assert acme.done not in names("globex", 'kind = "segment_video"')
    assert_serves(secure, channel)


def test_a_request_id_of_another_tenant_makes_a_new_operation(secure, jobs, operations, channel, acme) -> None:  # noqa: ANN001
    """Idempotency keys are per tenant: globex reusing acme's request_id neither gets acme's
    operation back nor is refused as a duplicate."""
    request = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=2, request_id=REQUEST_ID)
    again = jobs.SegmentVideo(request, metadata=secure.as_key("acme"), timeout=60)
    assert again.name == acme.done  # control: acme's own retry gets its operation
    theirs = jobs.SegmentVideo(request, metadata=secure.as_key("globex"), timeout=60)
    assert theirs.name != acme.done
    _finished(operations, theirs.name, secure.as_key("globex"))
    assert_serves(secure, channel)


# -- uploads -------------------------------------------------------------------------------------------


def test_an_upload_of_another_tenant_cannot_drive_a_segment_video(secure, jobs, channel, acme) -> None:  # noqa: ANN001
    them, unknown = secure.as_key("globex"), uuid.uuid4().hex

    def submit(upload_id: str):  # noqa: ANN202
        request = jobs_pb2.SegmentVideoRequest(upload_id=upload_id, box=BOX, max_frames=2)
        return lambda: jobs.SegmentVideo(request, metadata=them, timeout=30)

    _same_refusal(submit(acme.upload_id), submit(unknown), acme.upload_id, unknown)
    assert_serves(secure, channel)


def test_an_upload_of_another_tenant_cannot_drive_a_talking_video(secure, jobs, channel, acme) -> None:  # noqa: ANN001
    them, unknown = secure.as_key("globex"), uuid.uuid4().hex

    def submit(upload_id: str):  # noqa: ANN202
        request = jobs_pb2.CreateTalkingVideoRequest(image_upload_id=upload_id, audio=tone_wav(1.0))
        return lambda: jobs.CreateTalkingVideo(request, metadata=them, timeout=30)

    _same_refusal(submit(acme.upload_id), submit(unknown), acme.upload_id, unknown)
    assert_serves(secure, channel)


def test_storage_stats_count_only_ones_own(secure, jobs, channel, acme) -> None:  # noqa: ANN001
    def uploads(key: str) -> int:
        stats = jobs.GetStorageStats(jobs_pb2.GetStorageStatsRequest(), metadata=secure.as_key(key), timeout=10)
        return next(t.bytes for t in stats.tiers if t.tier == "uploads")

    assert uploads("acme") >= acme.upload_bytes
    assert uploads("globex") == 0  # globex never uploads in this module
    assert_serves(secure, channel)


# -- tracking sessions -------------------------------------------------------------------------------------


def test_a_session_of_another_tenant_cannot_be_resumed(secure, tracking, channel, acme) -> None:  # noqa: ANN001
    them = secure.as_key("globex")
    unknown = uuid.uuid4().hex[: len(acme.session_id)].ljust(len(acme.session_id), "0")

    def resume(session_id: str):  # noqa: ANN202
        request = track_pb2.TrackRequest(open=track_pb2.OpenSession(resume_session_id=session_id, keep_on_close=True))
        return lambda: list(tracking.Track(iter([request]), metadata=them, timeout=30))

    _same_refusal(resume(acme.session_id), resume(unknown), acme.session_id, unknown)
    # acme resumes it where it left off: the attempt neither took nor released it.
    request = track_pb2.TrackRequest(open=track_pb2.OpenSession(resume_session_id=acme.session_id, keep_on_close=True))
    opened = list(tracking.Track(iter([request]), metadata=secure.as_key("acme"), timeout=30))[0].session
    assert opened.resumed and opened.session_id == acme.session_id and opened.next_frame_index == 1
    assert_serves(secure, channel)


def test_cross_tenant_attempts_are_audited_without_the_secret(secure, operations, channel, acme) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError):
        operations.GetOperation(operations_pb2.GetOperationRequest(name=acme.done), metadata=secure.as_key("globex"), timeout=10)
    time.sleep(0.3)  # the audit line is written as the call ends
    records = [r for r in secure.orchestrator.log_records() if r.get("event") == "cross_tenant"]
    assert any(r.get("key_id") == secure.keys["globex"]["key_id"] for r in records), records[-3:]
    text = "\n".join(map(str, records))
    assert secure.key("globex") not in text and secure.key("acme") not in text
    assert_serves(secure, channel)


def test_no_tenant_data_in_metric_labels(secure, acme) -> None:  # noqa: ANN001
    """/metrics (loopback) names neither sessions, operations, uploads, tenants nor keys."""
    import httpx

    text = httpx.get(secure.orchestrator.metrics_url, timeout=10).text
    for secret in (acme.session_id, acme.done.removeprefix("operations/"), acme.upload_id, "acme", "globex",
                   secure.keys["acme"]["key_id"], secure.keys["globex"]["key_id"]):
        assert secret not in text, secret


@pytest.mark.parametrize(
    "artifact",
    ["../frames.json", "../../jobs.sqlite3", "/etc/passwd", "frames.json/../../../etc/passwd", "..", "masks.zip\x00.json"],
)
def test_an_artifact_name_cannot_leave_its_operation(secure, jobs, channel, acme, artifact: str) -> None:  # noqa: ANN001
    """acme's own operation, an artifact name that walks out of it: refused, no bytes."""
    request = jobs_pb2.DownloadArtifactRequest(name=acme.done, artifact=artifact)
    error = refusal(lambda: list(jobs.DownloadArtifact(request, metadata=secure.as_key("acme"), timeout=10)))
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (error.code(), error.details())
    assert str(secure.store.parent) not in (error.details() or "")
    assert_serves(secure, channel)


@pytest.mark.parametrize(
    "filter_",
    [
        'tenant = "acme"',
        "state = SUCCEEDED OR 1=1",
        "kind = \"segment_video' OR '1'='1\"",
        'name = "' + "operations/x\" OR tenant = \"acme" + '"',
        "state = SUCCEEDED; DROP TABLE operations; --",
    ],
)
def test_a_list_filter_cannot_reach_another_tenant(secure, operations, channel, acme, filter_: str) -> None:  # noqa: ANN001
    """Filter text that tries to widen the listing (a tenant clause, SQL): INVALID_ARGUMENT, or
    globex's own operations only."""
    request = operations_pb2.ListOperationsRequest(filter=filter_, page_size=1000)
    try:
        listed = operations.ListOperations(request, metadata=secure.as_key("globex"), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    else:
        assert acme.done not in {op.name for op in listed.operations}
    # The store is intact: acme still lists its operation.
    mine = operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=1000), metadata=secure.as_key("acme"), timeout=10)
    assert acme.done in {op.name for op in mine.operations}
    assert_serves(secure, channel)


def test_a_page_token_of_another_tenant_lists_nothing_of_theirs(secure, jobs, operations, channel, acme) -> None:  # noqa: ANN001
    me = secure.as_key("acme")
    # acme has at least two operations (the fixture's, and this one's).
    second = jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=1), metadata=me, timeout=60)
    first_page = operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=1), metadata=me, timeout=10)
    assert first_page.next_page_token
    try:
        theirs = operations.ListOperations(
            operations_pb2.ListOperationsRequest(page_size=1000, page_token=first_page.next_page_token),
            metadata=secure.as_key("globex"), timeout=10,
        )  # fmt: skip
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
    else:
        assert not {acme.done, second.name} & {op.name for op in theirs.operations}
    _finished(operations, second.name, me)
    assert_serves(secure, channel)


def test_a_live_session_of_another_tenant_reads_as_unknown(secure, tracking, channel) -> None:  # noqa: ANN001
    """acme's session driven by an open stream right now: globex's resume is NOT_FOUND like a
    key nobody holds, not "driven by another stream" (which would say it exists)."""
    import threading

    release = threading.Event()

    def held():  # noqa: ANN202
        yield track_pb2.TrackRequest(open=track_pb2.OpenSession())
        release.wait(60)

    stream = tracking.Track(held(), metadata=secure.as_key("acme"), timeout=120)
    try:
        live = next(stream).session.session_id
        unknown = uuid.uuid4().hex
        them = secure.as_key("globex")

        def resume(session_id: str):  # noqa: ANN202
            request = track_pb2.TrackRequest(open=track_pb2.OpenSession(resume_session_id=session_id))
            return lambda: list(tracking.Track(iter([request]), metadata=them, timeout=30))

        _same_refusal(resume(live), resume(unknown), live, unknown)
    finally:
        release.set()
        stream.cancel()
    assert_serves(secure, channel)


def test_a_session_key_of_another_tenant_opens_ones_own_session(secure, tracking, channel, acme) -> None:  # noqa: ANN001
    """globex opening a session under the key acme's session has: its own new session (keys are
    per tenant), and acme's is untouched."""
    request = track_pb2.TrackRequest(open=track_pb2.OpenSession(session_key=acme.session_id))
    theirs = list(tracking.Track(iter([request]), metadata=secure.as_key("globex"), timeout=30))[0].session
    assert theirs.session_id == acme.session_id and not theirs.resumed and theirs.next_frame_index == 0
    mine = track_pb2.TrackRequest(open=track_pb2.OpenSession(resume_session_id=acme.session_id, keep_on_close=True))
    opened = list(tracking.Track(iter([mine]), metadata=secure.as_key("acme"), timeout=30))[0].session
    assert opened.resumed and opened.next_frame_index == 1
    assert_serves(secure, channel)


def test_a_request_id_of_another_tenant_with_other_parameters_is_no_conflict(secure, jobs, operations, channel, acme) -> None:  # noqa: ANN001
    """The same request_id with a different request is a conflict within one tenant; across
    tenants it must be no conflict at all (a conflict would say the id is in use)."""
    other = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=1, request_id=REQUEST_ID + "-x")
    mine = jobs.SegmentVideo(other, metadata=secure.as_key("acme"), timeout=60)
    theirs_request = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=2, request_id=REQUEST_ID + "-x")
    theirs = jobs.SegmentVideo(theirs_request, metadata=secure.as_key("globex"), timeout=60)
    assert theirs.name != mine.name
    for name, key in ((mine.name, "acme"), (theirs.name, "globex")):
        _finished(operations, name, secure.as_key(key))
    assert_serves(secure, channel)
