"""Long-running jobs end to end: the real orchestrator, real Triton, the D-ID emulator, the
SQLite store; talking video and video segmentation to completion, watch streams, retries,
permanent failures, cancellation and the Operations service."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import struct
import time
import zipfile

import av
import cv2
import grpc
import httpx
import numpy as np
import pytest
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from did_emulator import EmulatorHandle
from framewise.v1 import common_pb2, jobs_service_pb2_grpc, vision_service_pb2, vision_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from tests.conftest import ASSETS, bad_request_fields
from tests.unit.test_did import tone_wav

S = jobs_pb2.JobStage
TALKING_STAGES = [
    (S.JOB_STAGE_INITIALIZED, 0),
    (S.JOB_STAGE_UPLOAD_COMPLETE, 20),
    (S.JOB_STAGE_DETECTION_RUNNING, 25),
    (S.JOB_STAGE_DETECTION_COMPLETE, 40),
    (S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, 50),
    (S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE, 60),
    (S.JOB_STAGE_DID_UPLOAD, 70),
    (S.JOB_STAGE_DID_PROCESSING, 75),
    (S.JOB_STAGE_DID_COMPLETE, 80),
    (S.JOB_STAGE_FINALIZING, 90),
    (S.JOB_STAGE_COMPLETED, 100),
]
TIMEOUT_S = 120


# A clean D-ID emulator (no faults, no request log) for every test.
pytestmark = pytest.mark.usefixtures("fresh_emulator")


def inject(did: EmulatorHandle, **spec: object) -> None:
    httpx.post(f"{did.url}/_emulator/faults", json=spec, timeout=5).raise_for_status()


def emulator_requests(did: EmulatorHandle, method: str, prefix: str) -> list[dict]:
    log = httpx.get(f"{did.url}/_emulator/requests", timeout=5).json()["requests"]
    return [r for r in log if r["method"] == method and r["path"].startswith(prefix)]


def talking_request(image: str = "zidane.jpg", **fields: object) -> jobs_pb2.CreateTalkingVideoRequest:
    return jobs_pb2.CreateTalkingVideoRequest(
        image=(ASSETS / "images" / image).read_bytes(), audio=tone_wav(1.0), **fields
    )


def watch(jobs: jobs_service_pb2_grpc.JobServiceStub, name: str, after: int = 0) -> list[jobs_pb2.WatchOperationResponse]:
    """Every event until the stream ends (heartbeats dropped)."""
    stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=name, after_sequence=after), timeout=TIMEOUT_S)
    return [e for e in stream if e.WhichOneof("event") != "heartbeat"]


def stages(events: list[jobs_pb2.WatchOperationResponse]) -> list[tuple[int, int]]:
    return [(e.stage_update.stage, round(e.stage_update.percent)) for e in events if e.WhichOneof("event") == "stage_update"]


def metadata(op: operations_pb2.Operation) -> jobs_pb2.JobMetadata:
    meta = jobs_pb2.JobMetadata()
    assert op.metadata.Unpack(meta)
    return meta


def download(jobs: jobs_service_pb2_grpc.JobServiceStub, name: str, artifact: str, offset: int = 0) -> tuple[bytes, jobs_pb2.DownloadArtifactResponse]:
    chunks = list(jobs.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(name=name, artifact=artifact, offset=offset), timeout=60))
    return b"".join(c.data for c in chunks), chunks[0]


def assert_contiguous(events: list[jobs_pb2.WatchOperationResponse], first: int = 1) -> None:
    assert [e.sequence for e in events] == list(range(first, first + len(events)))


# --------------------------------------------------------------------------- talking video


def test_talking_video_runs_every_stage_in_order_and_stores_a_real_video(jobs, operations, did_emulator, channel) -> None:
    op = jobs.CreateTalkingVideo(talking_request(), timeout=30)
    assert op.name.startswith("operations/") and not op.done
    assert metadata(op).kind == jobs_pb2.JOB_KIND_TALKING_VIDEO

    events = watch(jobs, op.name)
    assert_contiguous(events)
    assert stages(events) == TALKING_STAGES
    assert events[-1].WhichOneof("event") == "complete"
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    detection = next(e.stage_update for e in events if e.stage_update.stage == S.JOB_STAGE_DETECTION_COMPLETE)
    assert "Detected 2 persons" in detection.message, detection.message
    matting = next(e.stage_update for e in events if e.stage_update.stage == S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE)
    # The CPU repository's matting model is the real U^2-Netp: nothing to warn about.
    assert "background removed" in matting.message and "STAND-IN" not in matting.message

    done = operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert done.done and done.WhichOneof("result") == "response"
    meta = metadata(done)
    assert meta.state == jobs_pb2.JOB_STATE_SUCCEEDED and meta.percent == 100 and meta.last_sequence == events[-1].sequence
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert done.response.Unpack(response)
    assert not response.matting_skipped and response.did_talk_id
    # The default selector picks the person with the largest box, as Detect sees them.
    detected = vision_service_pb2_grpc.VisionServiceStub(channel).Detect(
        vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=(ASSETS / "images" / "zidane.jpg").read_bytes())),
        timeout=30,
    )
    largest = max(detected.detections, key=lambda d: (d.box.x2 - d.box.x1) * (d.box.y2 - d.box.y1))
    assert response.person_box == largest.box

    video, first = download(jobs, op.name, response.video.name)
    assert first.media_type == "video/mp4" and len(video) == response.video.size_bytes == first.total_size_bytes
    assert hashlib.sha256(video).hexdigest() == response.video.sha256 == first.sha256
    with av.open(io.BytesIO(video)) as container:
        assert container.streams.video and container.streams.audio
        assert container.duration is not None and container.duration / 1e6 == pytest.approx(1.0, abs=0.2)
    # Resume a download from an offset.
    tail, _ = download(jobs, op.name, response.video.name, offset=len(video) - 100)
    assert tail == video[-100:]
    # The photo D-ID received is the matted person: RGBA, cropped around the chosen box.
    person, _ = download(jobs, op.name, "person.png")
    rgba = cv2.imdecode(np.frombuffer(person, np.uint8), cv2.IMREAD_UNCHANGED)
    assert rgba.ndim == 3 and rgba.shape[2] == 4
    assert len(emulator_requests(did_emulator, "POST", "/talks")) == 1


def test_watchers_late_or_resuming_see_each_event_exactly_once(jobs) -> None:
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    live = watch(jobs, op.name)
    late = watch(jobs, op.name)
    assert [e.SerializeToString() for e in late] == [e.SerializeToString() for e in live]
    for after in (1, 5, len(live) - 1):
        resumed = watch(jobs, op.name, after=after)
        assert [e.sequence for e in resumed] == list(range(after + 1, len(live) + 1))
        assert resumed == live[after:]
    matting = next(e.stage_update for e in live if e.stage_update.stage == S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE)
    assert "skip_matting" in matting.message
    # Without matting, D-ID gets (and the job keeps) the plain crop as JPEG: no alpha to keep.
    person, first = download(jobs, op.name, "person.jpg")
    crop = cv2.imdecode(np.frombuffer(person, np.uint8), cv2.IMREAD_UNCHANGED)
    assert first.media_type == "image/jpeg" and crop.ndim == 3 and crop.shape[2] == 3
    with pytest.raises(grpc.RpcError) as err:
        watch(jobs, op.name, after=len(live) + 5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_did_rate_limit_is_retried_and_every_retry_is_an_event(jobs, did_emulator) -> None:
    inject(did_emulator, path="/talks", method="POST", status=429, times=3, retry_after=0)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    retries = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert [r.attempt for r in retries] == [1, 2, 3]
    assert all(r.will_retry and r.error_class == jobs_pb2.ERROR_CLASS_EXTERNAL for r in retries)
    assert all(r.stage == S.JOB_STAGE_DID_PROCESSING for r in retries)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert [r["status"] for r in emulator_requests(did_emulator, "POST", "/talks")] == [429, 429, 429, 201]


def _succeeds_after_five_did_processing_retries(jobs) -> None:  # noqa: ANN001
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    retries = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert [r.attempt for r in retries] == [1, 2, 3, 4, 5]
    assert all(r.will_retry and r.stage == S.JOB_STAGE_DID_PROCESSING for r in retries)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_retry_numbers_keep_counting_when_the_stage_itself_is_retried(jobs, did_emulator) -> None:
    """Five 429s: the D-ID client gives up after its 5 attempts (4 retries), the executor retries
    the stage, which then succeeds. The error events count on (1..5) instead of restarting."""
    inject(did_emulator, path="/talks", method="POST", status=429, times=5, retry_after=0)
    _succeeds_after_five_did_processing_retries(jobs)
    assert [r["status"] for r in emulator_requests(did_emulator, "POST", "/talks")] == [429] * 5 + [201]


def test_polls_failing_past_the_client_retries_keep_the_same_talk(jobs, did_emulator) -> None:
    """D-ID answers 500 to five polls in a row: the client gives up, the stage is retried and polls
    the talk it already created. A second POST /talks would render (and bill) the video twice."""
    inject(did_emulator, path="/talks/*", method="GET", status=500, times=5)
    _succeeds_after_five_did_processing_retries(jobs)
    assert [r["status"] for r in emulator_requests(did_emulator, "POST", "/talks")] == [201]
    polls = [r["status"] for r in emulator_requests(did_emulator, "GET", "/talks/")]
    assert polls[:5] == [500] * 5 and polls[-1] == 200


def test_a_404_for_the_saved_talk_is_retried_through_the_talk_listing(jobs, did_emulator) -> None:
    # GET /talks/{id} answers 404 once: the stage is retried (talk_not_found), and the retry looks for a talk
    # made from the job's uploads before posting. The emulator still lists it, so it is adopted: one POST.
    inject(did_emulator, path="/talks/*", method="GET", status=404, kind="NotFoundError", description="talk not found", times=1)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    (gone,) = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert gone.kind == "talk_not_found" and gone.will_retry and gone.error_class == jobs_pb2.ERROR_CLASS_EXTERNAL
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert [r["status"] for r in emulator_requests(did_emulator, "POST", "/talks")] == [201]
    assert [r["status"] for r in emulator_requests(did_emulator, "GET", "/talks") if r["path"] == "/talks"] == [200, 200]


def test_did_permanent_error_fails_with_its_kind_and_description(jobs, operations, did_emulator) -> None:
    inject(did_emulator, path="/images", method="POST", status=400, kind="BadRequestError", description="image has no face", times=1)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    last = events[-1]
    assert last.WhichOneof("event") == "error" and not last.error.will_retry
    assert last.error.error_class == jobs_pb2.ERROR_CLASS_PERMANENT
    assert last.error.kind == "BadRequestError" and "image has no face" in last.error.description
    assert last.error.stage == S.JOB_STAGE_DID_UPLOAD
    done = operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert done.done and done.WhichOneof("result") == "error"
    assert done.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "image has no face" in done.error.message
    assert metadata(done).state == jobs_pb2.JOB_STATE_FAILED
    # One attempt: a permanent error is not retried.
    assert len(emulator_requests(did_emulator, "POST", "/images")) == 1
    with pytest.raises(grpc.RpcError) as err:
        download(jobs, op.name, "talking_video.mp4")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_did_timeout_is_retried(jobs, did_emulator) -> None:
    # The test orchestrator's D-ID timeout is 2 s.
    inject(did_emulator, path="/audios", method="POST", delay_s=3.0, times=1)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    retries = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert len(retries) == 1 and retries[0].will_retry and retries[0].kind == "Timeout"
    assert retries[0].error_class == jobs_pb2.ERROR_CLASS_RECOVERABLE
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_photo_without_a_person_fails_fast(jobs) -> None:
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    _, png = cv2.imencode(".png", cv2.merge([gradient, gradient[::-1], gradient]))
    request = jobs_pb2.CreateTalkingVideoRequest(image=png.tobytes(), audio=tone_wav(0.5))
    op = jobs.CreateTalkingVideo(request, timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].error.kind == "no_person_found" and not events[-1].error.will_retry
    assert events[-1].error.error_class == jobs_pb2.ERROR_CLASS_PERMANENT
    assert events[-1].error.stage == S.JOB_STAGE_DETECTION_RUNNING


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"image": b"not an image at all", "audio": tone_wav(0.5)}, "image"),
        ({"image": (ASSETS / "images" / "bus.jpg").read_bytes(), "audio": b"RIFF\x00\x00\x00\x00WAVEjunk"}, "audio"),
        ({"image": (ASSETS / "images" / "bus.jpg").read_bytes(), "audio": b"\x00" * 4096}, "audio"),
        ({"audio": tone_wav(0.5)}, "image"),
        ({"image": (ASSETS / "images" / "bus.jpg").read_bytes(), "audio_upload_id": "nothex"}, "audio_upload_id"),
        (
            {
                "image": (ASSETS / "images" / "bus.jpg").read_bytes(),
                "audio": tone_wav(0.5),
                "person": jobs_pb2.PersonSelector(point=common_pb2.Point(x=99999, y=1)),
            },
            "person.point",
        ),
        (
            {"image": (ASSETS / "images" / "bus.jpg").read_bytes(), "audio": tone_wav(0.5), "skip_matting": True,
             "require_matting": True},
            "require_matting",
        ),
    ],
)
def test_bad_talking_video_requests_are_refused_at_submit(jobs, request_fields, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        jobs.CreateTalkingVideo(jobs_pb2.CreateTalkingVideoRequest(**request_fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    fields = bad_request_fields(err.value) or []
    assert field in fields, (err.value.details(), fields)


def test_a_header_only_wav_is_refused_at_submit_naming_the_audio_field(jobs, did_emulator) -> None:
    # 44 bytes: a valid RIFF/WAVE header whose data chunk announces 2.0 s (16 kHz mono 16-bit)
    # but no sample follows. It used to pass as "2.0 s of audio" and fail three times at D-ID.
    rate, claimed = 16000, 64000
    header = (
        b"RIFF" + struct.pack("<I", 36 + claimed) + b"WAVE" + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data" + struct.pack("<I", claimed)
    )
    assert len(header) == 44
    for request in (
        jobs_pb2.CreateTalkingVideoRequest(image=(ASSETS / "images" / "bus.jpg").read_bytes(), audio=header),
        jobs_pb2.CreateTalkingVideoRequest(
            image=(ASSETS / "images" / "bus.jpg").read_bytes(),
            audio_upload_id=upload(jobs, header, jobs_pb2.FILE_KIND_AUDIO).upload_id,
        ),
    ):
        field = request.WhichOneof("audio_source")
        with pytest.raises(grpc.RpcError) as err:
            jobs.CreateTalkingVideo(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "no audio samples" in err.value.details(), err.value.details()
        assert bad_request_fields(err.value) == [field]
    # Refused before any D-ID call.
    assert not emulator_requests(did_emulator, "POST", "/audios")


def test_cancel_mid_job_stops_polling_and_ends_cancelled(jobs, operations, did_emulator) -> None:
    inject(did_emulator, talk_outcome="done", stage_delay_s=30)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), timeout=TIMEOUT_S)
    seen = []
    for event in stream:
        seen.append(event)
        if event.stage_update.stage == S.JOB_STAGE_DID_PROCESSING:
            break
    stream.cancel()
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=30)
    done = operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert done.done and metadata(done).state == jobs_pb2.JOB_STATE_CANCELLED
    assert done.error.code == grpc.StatusCode.CANCELLED.value[0]
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_CANCELLED
    polls = len(emulator_requests(did_emulator, "GET", "/talks/"))
    time.sleep(0.5)
    assert len(emulator_requests(did_emulator, "GET", "/talks/")) == polls, "D-ID polling went on after cancel"
    with pytest.raises(grpc.RpcError) as err:
        operations.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_request_id_makes_submission_idempotent(jobs) -> None:
    first = jobs.CreateTalkingVideo(talking_request(skip_matting=True, request_id="client-key-1"), timeout=30)
    again = jobs.CreateTalkingVideo(talking_request(skip_matting=True, request_id="client-key-1"), timeout=30)
    assert again.name == first.name
    watch(jobs, first.name)


# --------------------------------------------------------------------------- operations


def test_operations_list_filter_page_wait_delete(jobs, operations) -> None:
    other = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)  # two SUCCEEDED at least: pages
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    for name in (other.name, op.name):
        waited = operations.WaitOperation(
            operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=60)), timeout=90
        )
        assert waited.done and metadata(waited).state == jobs_pb2.JOB_STATE_SUCCEEDED

    names: list[str] = []
    token = ""
    while True:
        page = operations.ListOperations(
            operations_pb2.ListOperationsRequest(name="operations", filter="state = SUCCEEDED", page_size=2, page_token=token),
            timeout=10,
        )
        assert len(page.operations) <= 2
        assert all(metadata(o).state == jobs_pb2.JOB_STATE_SUCCEEDED for o in page.operations)
        names += [o.name for o in page.operations]
        token = page.next_page_token
        if not token:
            break
    assert op.name in names and len(names) == len(set(names))
    # A token continues its own listing only (AIP-158): another filter with it is refused.
    first = operations.ListOperations(operations_pb2.ListOperationsRequest(filter="state = SUCCEEDED", page_size=1), timeout=10)
    assert first.next_page_token
    same = operations.ListOperations(  # the same filter written another way continues the listing
        operations_pb2.ListOperationsRequest(filter="state=SUCCEEDED", page_size=1, page_token=first.next_page_token), timeout=10
    )
    assert same.operations[0].name != first.operations[0].name
    for changed in ("state = FAILED", "", "state = SUCCEEDED AND kind = SEGMENT_VIDEO"):
        with pytest.raises(grpc.RpcError) as err:
            operations.ListOperations(
                operations_pb2.ListOperationsRequest(filter=changed, page_token=first.next_page_token), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "another filter" in err.value.details()
    failed = operations.ListOperations(
        operations_pb2.ListOperationsRequest(filter="state = FAILED OR state = CANCELLED AND kind = TALKING_VIDEO"), timeout=10
    )
    assert all(metadata(o).state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED) for o in failed.operations)
    for bad in ("state == RUNNING", "colour = RED", "state = SLEEPING"):
        with pytest.raises(grpc.RpcError) as err:
            operations.ListOperations(operations_pb2.ListOperationsRequest(filter=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        operations.ListOperations(operations_pb2.ListOperationsRequest(page_token="garbage"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name), timeout=10)
    for call in (
        lambda: operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10),
        lambda: watch(jobs, op.name),
        lambda: download(jobs, op.name, "talking_video.mp4"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_delete_of_an_unfinished_operation_is_refused(jobs, operations, did_emulator) -> None:
    inject(did_emulator, talk_outcome="done", stage_delay_s=5)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=30)
    operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=op.name), timeout=10)


# --------------------------------------------------------------------------- uploads, storage


def upload(jobs, data: bytes, kind: int, *, sha256: str | None = None, size: int | None = None, chunk: int = 64 * 1024):
    header = jobs_pb2.UploadHeader(
        kind=kind, filename="clip", size_bytes=len(data) if size is None else size, sha256=sha256 or hashlib.sha256(data).hexdigest()
    )
    messages = [jobs_pb2.UploadFileRequest(header=header)]
    messages += [jobs_pb2.UploadFileRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return jobs.UploadFile(iter(messages), timeout=60)


def test_upload_checks_size_and_sha256(jobs) -> None:
    data = (ASSETS / "images" / "bus.jpg").read_bytes()
    response = upload(jobs, data, jobs_pb2.FILE_KIND_IMAGE)
    assert len(response.upload_id) == 32 and response.size_bytes == len(data)
    assert response.sha256 == hashlib.sha256(data).hexdigest()
    for kwargs, code in (
        ({"sha256": "0" * 64}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"size": len(data) + 1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"size": len(data) - 1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"size": 3 * 1024**3}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ):
        with pytest.raises(grpc.RpcError) as err:
            upload(jobs, data, jobs_pb2.FILE_KIND_IMAGE, **kwargs)
        assert err.value.code() == code, (kwargs, err.value.details())
    # An uploaded photo and audio drive a job.
    audio = upload(jobs, tone_wav(0.5), jobs_pb2.FILE_KIND_AUDIO)
    image = upload(jobs, (ASSETS / "images" / "person.jpg").read_bytes(), jobs_pb2.FILE_KIND_IMAGE)
    op = jobs.CreateTalkingVideo(
        jobs_pb2.CreateTalkingVideoRequest(image_upload_id=image.upload_id, audio_upload_id=audio.upload_id, skip_matting=True),
        timeout=30,
    )
    assert watch(jobs, op.name)[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    # An image upload is not audio.
    with pytest.raises(grpc.RpcError) as err:
        jobs.CreateTalkingVideo(
            jobs_pb2.CreateTalkingVideoRequest(image_upload_id=image.upload_id, audio_upload_id=image.upload_id), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_storage_stats_report_every_tier(jobs) -> None:
    stats = jobs.GetStorageStats(jobs_pb2.GetStorageStatsRequest(), timeout=10)
    assert [t.tier for t in stats.tiers] == ["uploads", "processed", "videos", "temp"]
    assert {t.tier: t.retention_seconds for t in stats.tiers} == {
        "uploads": 7 * 86400, "processed": 3 * 86400, "videos": 30 * 86400, "temp": 3600
    }  # fmt: skip
    assert stats.disk_total_bytes > stats.disk_free_bytes > 0
    assert stats.low_disk_threshold_bytes == 5 * 10**9
    assert stats.low_disk == (stats.disk_free_bytes < stats.low_disk_threshold_bytes)


# --------------------------------------------------------------------------- video segmentation


def test_segment_video_from_a_server_path_writes_every_artifact(jobs) -> None:
    request = jobs_pb2.SegmentVideoRequest(
        server_path="bedroom.mp4", box=common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300), max_frames=8
    )
    op = jobs.SegmentVideo(request, timeout=60)
    events = watch(jobs, op.name)
    assert_contiguous(events)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    seen = [s for s, _ in stages(events)]
    assert seen == [
        S.JOB_STAGE_INITIALIZED, S.JOB_STAGE_UPLOAD_COMPLETE, S.JOB_STAGE_DECODING, S.JOB_STAGE_TRACKING,
        S.JOB_STAGE_WRITING_ARTIFACTS, S.JOB_STAGE_FINALIZING, S.JOB_STAGE_COMPLETED,
    ]  # fmt: skip
    progress = [e.progress_update for e in events if e.WhichOneof("event") == "progress_update"]
    assert progress and progress[-1].done == progress[-1].total == 8
    tracked = [p for p in progress if p.stage == S.JOB_STAGE_TRACKING]
    assert "STAND-IN" in tracked[-1].message  # the test repository serves SAM 2 stand-ins
    names = {a.name for a in events[-1].complete.artifacts}
    assert {"overlay.mp4", "frames.json", "masks.zip"} <= names
    frames, _ = download(jobs, op.name, "frames.json")
    parsed = json.loads(frames)
    assert len(parsed) == 8
    masks, _ = download(jobs, op.name, "masks.zip")
    with zipfile.ZipFile(io.BytesIO(masks)) as archive:
        assert len(archive.namelist()) == 8


def test_cancel_mid_tracking_ends_cancelled_and_frees_the_tracking_slot(jobs, operations) -> None:
    request = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300))
    op = jobs.SegmentVideo(request, timeout=60)
    stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), timeout=TIMEOUT_S)
    for event in stream:
        if event.WhichOneof("event") == "progress_update" and event.progress_update.stage == S.JOB_STAGE_TRACKING:
            break  # frames are being tracked
    stream.cancel()
    operations.CancelOperation(operations_pb2.CancelOperationRequest(name=op.name), timeout=30)
    done = operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert done.done and metadata(done).state == jobs_pb2.JOB_STATE_CANCELLED
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_CANCELLED and not events[-1].complete.artifacts
    tracked = [e.progress_update for e in events if e.WhichOneof("event") == "progress_update"]
    assert tracked[-1].done < tracked[-1].total  # it stopped part-way
    # The one tracking slot (--tracking-slots 1) is free again: the next segmentation runs to the end.
    after = jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=request.box, max_frames=4), timeout=60)
    assert watch(jobs, after.name)[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"server_path": "../videos/bedroom.mp4"}, "server_path"),
        ({"server_path": "/etc/passwd"}, "server_path"),
        ({"server_path": "bedroom.mp4", "box": common_pb2.BoundingBox(x1=10, y1=10, x2=99999, y2=50)}, "box"),
        ({"server_path": "bedroom.mp4", "box": common_pb2.BoundingBox(x1=10, y1=10, x2=10, y2=50)}, "box"),
        ({"server_path": "bedroom.mp4"}, "box"),
        ({"server_path": "a" * 3000}, "server_path"),  # a part over NAME_MAX: ENAMETOOLONG
        ({"server_path": "b" * 5000}, "server_path"),  # over PATH_MAX: refused before any lookup
        ({"server_path": "bedroom.mp4", "request_id": "r" * 200}, "request_id"),
        ({"server_path": "bedroom.mp4", "box": common_pb2.BoundingBox(x1=float("nan"), y1=10, x2=50, y2=50)}, "box"),
    ],
)
def test_bad_segment_video_requests_are_refused(jobs, fields, field) -> None:
    fields.setdefault("box", common_pb2.BoundingBox(x1=10, y1=10, x2=50, y2=50)) if field != "box" else None
    with pytest.raises(grpc.RpcError) as err:
        jobs.SegmentVideo(jobs_pb2.SegmentVideoRequest(**fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    named = bad_request_fields(err.value) or []
    assert any(f == field or f.startswith(field + ".") for f in named), (named, err.value.details())
    assert len(err.value.details()) < 600 and str(ASSETS) not in err.value.details()


def test_operation_names_empty_or_oversized_are_invalid_not_unknown(jobs, operations) -> None:
    """An empty name is a malformed request, not an operation that cannot be found; an oversized
    one (5,000 characters) once came back RESOURCE_EXHAUSTED "Stream removed", its echo in the
    error too large for the client's metadata limit."""
    calls = {
        "GetOperation": lambda name: operations.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10),
        "CancelOperation": lambda name: operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name), timeout=10),
        "DeleteOperation": lambda name: operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name), timeout=10),
        "WaitOperation": lambda name: operations.WaitOperation(operations_pb2.WaitOperationRequest(name=name), timeout=10),
        "WatchOperation": lambda name: list(jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), timeout=10)),
        "DownloadArtifact": lambda name: list(
            jobs.DownloadArtifact(jobs_pb2.DownloadArtifactRequest(name=name, artifact="masks.zip"), timeout=10)
        ),
    }
    for rpc, call in calls.items():
        for name, says in (("", "name is empty"), ("operations/" + "f" * 5000, "name is 5011 characters long")):
            with pytest.raises(grpc.RpcError) as err:
                call(name)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, err.value.code(), err.value.details())
            assert says in err.value.details() and bad_request_fields(err.value) == ["name"], rpc
    # A well-formed name that names nothing is still NOT_FOUND, its echo shortened.
    with pytest.raises(grpc.RpcError) as err:
        operations.GetOperation(operations_pb2.GetOperationRequest(name="operations/" + "e" * 200), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "(211 characters) not found" in err.value.details()


def test_corrupt_video_upload_is_refused(jobs) -> None:
    data = (ASSETS / "videos" / "bedroom.mp4").read_bytes()[:4096] + bytes(range(256)) * 64
    uploaded = upload(jobs, data, jobs_pb2.FILE_KIND_VIDEO)
    with pytest.raises(grpc.RpcError) as err:
        jobs.SegmentVideo(
            jobs_pb2.SegmentVideoRequest(upload_id=uploaded.upload_id, box=common_pb2.BoundingBox(x1=1, y1=1, x2=20, y2=20)),
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_watchers_cancelling_as_the_stream_ends_leave_the_server_serving(jobs, operations, channel) -> None:
    """Clients that cancel a watch right after the terminal event (Ctrl-C, early break) once
    crashed the server inside grpc's C core; hammer that window."""
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    total = len(watch(jobs, op.name))
    for i in range(150):
        stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name, after_sequence=total - 1 - i % 2), timeout=30)
        for event in stream:
            if event.WhichOneof("event") == "complete":
                stream.cancel()
                break
    done = operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert done.done


async def test_low_disk_refuses_submits_and_uploads_until_space_is_back(tmp_path) -> None:  # noqa: ANN001
    """Low disk turns JobService NOT_SERVING; a submit or an upload is refused UNAVAILABLE with
    the reason, not accepted only to fail on a full disk. In process: the disk cannot be filled
    for a test, the threshold is raised above the free space instead."""
    import dataclasses

    from server.errors import ServiceError
    from server.jobs.files.uploads import UploadStore
    from server.servicers.jobs import JobServicer
    from tests.unit.test_job_engine import SEGMENT, Stage, environment

    async def chunks():  # noqa: ANN202
        yield jobs_pb2.UploadFileRequest(header=jobs_pb2.UploadHeader(kind=jobs_pb2.FILE_KIND_IMAGE, size_bytes=1, sha256="0" * 64))
        yield jobs_pb2.UploadFileRequest(chunk=b"x")

    async with environment(tmp_path) as env:
        queue = env.queue(Stage(jobs_pb2.JOB_STAGE_DECODING, lambda ctx: asyncio.sleep(0)))
        await queue.start()
        servicer = JobServicer(queue, queue.bus, UploadStore(env.storage, max_bytes=1 << 20), env.storage)
        request = jobs_pb2.SegmentVideoRequest(server_path="bedroom.mp4", box=common_pb2.BoundingBox(x1=1, y1=1, x2=9, y2=9))
        env.storage.config = dataclasses.replace(env.storage.config, low_disk_bytes=10**18)
        assert (await env.storage.stats()).low_disk
        for attempt in (servicer.SegmentVideo(request, None), servicer.UploadFile(chunks(), None)):  # type: ignore[arg-type]
            with pytest.raises(ServiceError) as refused:
                await attempt
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "low on disk space" in refused.value.message
            assert refused.value.retry_after_s
        assert await env.store.list_operations(states=None, kind=None, page_size=10, page_token="") == ([], "")

        env.storage.config = dataclasses.replace(env.storage.config, low_disk_bytes=0)
        assert not (await env.storage.stats()).low_disk
        accepted = await servicer.SegmentVideo(request, None)  # type: ignore[arg-type]
        assert accepted.name.startswith("operations/")
