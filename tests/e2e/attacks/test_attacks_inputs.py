"""Attacks through inputs, over TLS with authentication required: oversized metadata and
messages (with and without credentials), an oversized operation name, and server-side paths
that try to leave the caller's media root (``<media root>/<tenant>/``): "..", absolute paths,
symlinks out of the tenant's folder (to /etc/passwd, into another tenant's folder, to the
shared root), a symlinked directory, symlink loops, NUL and backslashes. Each gets its clear
code (the path cases name the field in google.rpc.BadRequest and never show the server's
folders) and the server answers the next valid call.
"""

from __future__ import annotations

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from framewise.v1 import common_pb2, jobs_service_pb2_grpc, vision_service_pb2, vision_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from tests.conftest import MAX_MESSAGE_BYTES, bad_request_fields
from tests.e2e.attacks.secure_server import SecureServer, all_rpcs, assert_serves, bearer, invoke, refusal

BOX = common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300)
LIST = next(r for r in all_rpcs() if r.name == "ListOperations")


@pytest.fixture(scope="module")
def channel(secure: SecureServer) -> grpc.Channel:
    return secure.channel()


# -- metadata and message sizes ----------------------------------------------------------------------


def test_a_6_kib_junk_bearer_token_is_unauthenticated(secure: SecureServer, channel: grpc.Channel) -> None:
    error = refusal(lambda: invoke(channel, LIST, metadata=bearer("x" * 6 * 1024)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    assert len(error.details() or "") < 1024
    assert_serves(secure, channel)


@pytest.mark.parametrize("size", [9 * 1024, 64 * 1024], ids=["9KiB", "64KiB"])
def test_an_oversized_authorization_header_is_refused(secure: SecureServer, channel: grpc.Channel, size: int) -> None:
    """Over the bearer token bound (8 KiB) or gRPC's metadata limit: refused before any
    credential check (UNAUTHENTICATED) or by the transport (RESOURCE_EXHAUSTED), never served."""
    error = refusal(lambda: invoke(channel, LIST, metadata=bearer("y" * size)))
    assert error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED), (error.code(), error.details())
    assert len(error.details() or "") < 1024
    assert_serves(secure, channel)


def test_a_flood_of_metadata_entries_with_a_valid_key_is_refused(secure: SecureServer, channel: grpc.Channel) -> None:
    """300 headers of 100 bytes (30 KB, over gRPC's metadata limit) next to a valid key."""
    junk = [(f"x-junk-{i}", "z" * 100) for i in range(300)]
    error = refusal(lambda: invoke(channel, LIST, metadata=secure.as_key("acme") + junk))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    assert_serves(secure, channel)


@pytest.mark.parametrize("credential", ["none", "key"])
def test_a_message_over_the_size_limit_is_refused(secure: SecureServer, channel: grpc.Channel, credential: str) -> None:
    metadata = secure.as_key("acme") if credential == "key" else []
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=b"\xff" * (MAX_MESSAGE_BYTES + 1024)))
    error = refusal(lambda: vision_service_pb2_grpc.VisionServiceStub(channel).Detect(request, metadata=metadata, timeout=60))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
    assert_serves(secure, channel)


def test_an_oversized_operation_name_is_invalid_and_not_echoed(secure: SecureServer, channel: grpc.Channel) -> None:
    name = "operations/" + "a" * 5000
    operations = operations_pb2_grpc.OperationsStub(channel)
    error = refusal(lambda: operations.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=secure.as_key("globex"), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert len(error.details() or "") < 1024
    assert_serves(secure, channel)


# -- server_path ---------------------------------------------------------------------------------------


def _submit(channel: grpc.Channel, secure: SecureServer, path: str, key: str = "acme") -> grpc.RpcError:
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    request = jobs_pb2.SegmentVideoRequest(server_path=path, box=BOX, max_frames=1)
    return refusal(lambda: jobs.SegmentVideo(request, metadata=secure.as_key(key), timeout=30))


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("../globex/secret.mp4", id="dotdot-into-another-tenant"),
        pytest.param("../outside.mp4", id="dotdot-to-the-shared-root"),
        pytest.param("bedroom.mp4/../../globex/secret.mp4", id="dotdot-after-a-file"),
        pytest.param("/etc/passwd", id="absolute"),
        pytest.param("./bedroom.mp4", id="dot-part"),
        pytest.param("..\\globex\\secret.mp4", id="backslashes"),
        pytest.param("bedroom.mp4\x00.txt", id="nul"),
        pytest.param("etc-passwd.mp4", id="symlink-to-etc-passwd"),
        pytest.param("neighbour.mp4", id="absolute-symlink-into-another-tenant"),
        pytest.param("relative-neighbour.mp4", id="relative-symlink-into-another-tenant"),
        pytest.param("up.mp4", id="symlink-to-the-shared-root"),
        pytest.param("globex-dir/secret.mp4", id="symlinked-directory-into-another-tenant"),
        pytest.param("loop-a.mp4", id="symlink-loop"),
        pytest.param("a" * 3000, id="part-over-name-max"),
    ],
)
def test_a_server_path_escaping_the_tenant_media_root_is_invalid(secure: SecureServer, channel: grpc.Channel, path: str) -> None:
    error = _submit(channel, secure, path)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert bad_request_fields(error) == ["server_path"], error.details()
    details = error.details() or ""
    assert str(secure.media_root) not in details and "/etc/passwd" not in details.replace(path, ""), details
    assert len(details) < 1024
    assert_serves(secure, channel)


def test_a_file_only_another_tenant_has_reads_as_missing(secure: SecureServer, channel: grpc.Channel) -> None:
    """globex's secret.mp4 named from acme's root: NOT_FOUND, as for a name nobody has."""
    theirs, nobody = _submit(channel, secure, "secret.mp4"), _submit(channel, secure, "nothing-here.mp4")
    assert theirs.code() == nobody.code() == grpc.StatusCode.NOT_FOUND, (theirs.details(), nobody.details())
    assert (theirs.details() or "").replace("secret.mp4", "NAME") == (nobody.details() or "").replace("nothing-here.mp4", "NAME")
    assert str(secure.media_root) not in (theirs.details() or "")
    assert_serves(secure, channel)


def test_a_percent_encoded_dotdot_is_a_literal_name(secure: SecureServer, channel: grpc.Channel) -> None:
    error = _submit(channel, secure, "%2e%2e/globex/secret.mp4")
    assert error.code() == grpc.StatusCode.NOT_FOUND, (error.code(), error.details())
    assert_serves(secure, channel)


def test_the_tenant_reads_its_own_media(secure: SecureServer, channel: grpc.Channel) -> None:
    """Control: the same server_path machinery accepts the tenant's own file."""
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    op = jobs.SegmentVideo(
        jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX, max_frames=1), metadata=secure.as_key("globex"), timeout=30
    )
    assert op.name.startswith("operations/")
    assert_serves(secure, channel)


# -- bounded echoes and undecodable messages ----------------------------------------------------------


def test_a_20000_character_class_name_is_invalid_and_bounded(secure: SecureServer, channel: grpc.Channel) -> None:
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=b"\xff\xd8"), class_names=["c" * 20_000])
    error = refusal(lambda: vision_service_pb2_grpc.VisionServiceStub(channel).Detect(request, metadata=secure.as_key("acme"), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert len(error.details() or "") < 1024
    assert_serves(secure, channel)


def test_an_empty_operation_name_is_invalid(secure: SecureServer, channel: grpc.Channel) -> None:
    operations = operations_pb2_grpc.OperationsStub(channel)
    error = refusal(lambda: operations.GetOperation(operations_pb2.GetOperationRequest(name=""), metadata=secure.as_key("acme"), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert_serves(secure, channel)


def test_a_5000_character_session_id_is_invalid_and_bounded(secure: SecureServer, channel: grpc.Channel) -> None:
    from framewise.v1 import tracking_service_pb2 as track_pb2
    from framewise.v1 import tracking_service_pb2_grpc

    request = track_pb2.TrackRequest(open=track_pb2.OpenSession(resume_session_id="s" * 5000))
    stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
    error = refusal(lambda: list(stub.Track(iter([request]), metadata=secure.as_key("acme"), timeout=30)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert len(error.details() or "") < 1024
    assert_serves(secure, channel)


@pytest.mark.parametrize("credential", ["none", "key"])
def test_bytes_that_are_no_message_never_reach_a_servicer(secure: SecureServer, channel: grpc.Channel, credential: str) -> None:
    """Raw bytes that do not parse as a DetectRequest: refused without an answer from the
    servicer (and without credentials, before anything else), and the server serves on."""
    metadata = secure.as_key("acme") if credential == "key" else []
    raw = channel.unary_unary("/framewise.v1.VisionService/Detect", request_serializer=None, response_deserializer=None)
    error = refusal(lambda: raw(b"\x0a\xff\xff\xff\xff\x0f garbage", metadata=metadata, timeout=10))
    # Without credentials, UNAUTHENTICATED (the credential is checked first) or INVALID_ARGUMENT;
    # with a key, INVALID_ARGUMENT: the bytes are the caller's fault.
    expected = (grpc.StatusCode.INVALID_ARGUMENT,) + ((grpc.StatusCode.UNAUTHENTICATED,) if credential == "none" else ())
    assert error.code() in expected, (error.code(), error.details())
    assert "<class" not in (error.details() or ""), error.details()  # no Python internals in the answer
    assert_serves(secure, channel)


def _job(operations: operations_pb2_grpc.OperationsStub, name: str, metadata) -> tuple[operations_pb2.Operation, int]:  # noqa: ANN001
    op = operations.GetOperation(operations_pb2.GetOperationRequest(name=name), metadata=metadata, timeout=10)
    meta = jobs_pb2.JobMetadata()
    assert op.metadata.Unpack(meta)
    return op, meta.state


def test_a_symlink_swapped_in_after_the_submit_is_still_refused(secure: SecureServer, channel: grpc.Channel) -> None:
    """acme submits a regular file of its own; while the job waits in the queue the file becomes
    a link into globex's folder. When the job runs, it must refuse the link as the submit would
    have (the tenant's media root holds at read time too), never read globex's video."""
    import shutil

    from tests.conftest import ASSETS, wait_until
    from tests.e2e.attacks.conftest import JOB_WORKERS

    jobs, operations, me = jobs_service_pb2_grpc.JobServiceStub(channel), operations_pb2_grpc.OperationsStub(channel), secure.as_key("acme")
    swap = secure.media_root / "acme" / "swap.mp4"
    shutil.copy(ASSETS / "videos" / "bedroom.mp4", swap)
    blockers = [jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=BOX), metadata=me, timeout=60)
                for _ in range(JOB_WORKERS)]
    try:
        wait_until(lambda: all(_job(operations, b.name, me)[1] == jobs_pb2.JOB_STATE_RUNNING for b in blockers), 60, "the blockers to run")
        op = jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path="swap.mp4", box=BOX, max_frames=1), metadata=me, timeout=60)
        assert _job(operations, op.name, me)[1] == jobs_pb2.JOB_STATE_QUEUED
        swap.unlink()
        swap.symlink_to(secure.media_root / "globex" / "secret.mp4")
    finally:
        for b in blockers:
            operations.CancelOperation(operations_pb2.CancelOperationRequest(name=b.name), metadata=me, timeout=30)
    wait_until(lambda: _job(operations, op.name, me)[0].done, 120, "the swapped job to end")
    done, state = _job(operations, op.name, me)
    assert state == jobs_pb2.JOB_STATE_FAILED, f"the job ran on the swapped-in link: {done}"
    assert "outside" in done.error.message, done.error.message
    assert str(secure.media_root) not in done.error.message
    assert_serves(secure, channel)


@pytest.mark.parametrize("credential", ["none", "no-jobs:write"])
def test_a_refused_upload_stream_is_cut_off_without_reading_it(secure: SecureServer, channel: grpc.Channel, credential: str) -> None:
    """64 MiB streamed to UploadFile without credentials (or without the scope): refused before
    the server reads the stream, so the client's sender stops long before its end (HTTP/2 flow
    control holds it to what the transport buffers)."""
    import hashlib

    metadata = secure.as_key(credential) if credential != "none" else []
    chunk, chunks = b"\0" * (1 << 20), 64
    pulled = 0

    def requests():  # noqa: ANN202
        nonlocal pulled
        header = jobs_pb2.UploadHeader(kind=jobs_pb2.FILE_KIND_VIDEO, filename="big.mp4", size_bytes=len(chunk) * chunks,
                                       sha256=hashlib.sha256(chunk * chunks).hexdigest())
        yield jobs_pb2.UploadFileRequest(header=header)
        for _ in range(chunks):
            pulled += 1
            yield jobs_pb2.UploadFileRequest(chunk=chunk)

    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    error = refusal(lambda: jobs.UploadFile(requests(), metadata=metadata, timeout=60))
    expected = grpc.StatusCode.UNAUTHENTICATED if credential == "none" else grpc.StatusCode.PERMISSION_DENIED
    assert error.code() == expected, (error.code(), error.details())
    assert pulled < chunks // 2, f"the client sent {pulled} of {chunks} MiB before the refusal"
    assert_serves(secure, channel)
