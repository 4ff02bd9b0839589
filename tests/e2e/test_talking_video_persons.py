"""Talking videos for every person in the photo (all_persons): one D-ID talk per detected person,
per-person artifacts and events, and one person's failed talk leaving the others' videos.

The real orchestrator, real Triton (detection and matting) and the D-ID emulator, whose talk
outcomes can target one person's talk by its source_url (the photo's upload carries the
person's file name, "person-2-matted.png").
"""

from __future__ import annotations

import io

import av
import cv2
import grpc
import numpy as np
import pytest
from google.longrunning import operations_pb2
from grpc_health.v1 import health_pb2

from framewise.v1 import jobs_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from tests.conftest import TritonProcess, health_status, job_args, start_orchestrator, stop_process, wait_until
from tests.e2e.test_jobs import TALKING_STAGES, download, emulator_requests, inject, stages, talking_request, watch

S = jobs_pb2.JobStage


# A clean D-ID emulator (no faults, no request log) for every test.
pytestmark = pytest.mark.usefixtures("fresh_emulator")


def finished(operations, name: str) -> operations_pb2.Operation:  # noqa: ANN001
    op = operations.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    assert op.done
    return op


def response_of(op: operations_pb2.Operation) -> jobs_pb2.CreateTalkingVideoResponse:
    assert op.WhichOneof("result") == "response", op.error
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert op.response.Unpack(response)
    return response


def percents(events: list[jobs_pb2.WatchOperationResponse]) -> list[float]:
    out = []
    for event in events:
        kind = event.WhichOneof("event")
        if kind in ("stage_update", "progress_update"):
            out.append(getattr(event, kind).percent)
    return out


def person_events(events: list[jobs_pb2.WatchOperationResponse]) -> list[jobs_pb2.ProgressUpdate]:
    return [e.progress_update for e in events if e.WhichOneof("event") == "progress_update" and e.progress_update.person]


def assert_is_video(data: bytes) -> None:
    with av.open(io.BytesIO(data)) as container:
        assert container.streams.video and container.streams.audio
        assert container.duration is not None and container.duration / 1e6 == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize(("image", "count"), [("zidane.jpg", 2), ("cloth-1.jpg", 3)])
def test_all_persons_makes_one_talk_per_person(jobs, operations, did_emulator, image: str, count: int) -> None:
    op = jobs.CreateTalkingVideo(talking_request(image, all_persons=True), timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    # The stage events are the single person's; the per-person steps are progress events.
    assert stages(events) == TALKING_STAGES
    values = percents(events)
    assert values == sorted(values), values
    detection = next(e.stage_update for e in events if e.stage_update.stage == S.JOB_STAGE_DETECTION_COMPLETE)
    assert f"Detected {count} persons" in detection.message, detection.message

    # Every per-person step names its person, in the message and in the field.
    per_person = person_events(events)
    for number in range(1, count + 1):
        mine = [p for p in per_person if p.person == number]
        assert {p.stage for p in mine} >= {
            S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, S.JOB_STAGE_DID_UPLOAD, S.JOB_STAGE_DID_PROCESSING
        }, mine
        assert all(p.message.startswith(f"person {number} of {count}: ") for p in mine), [p.message for p in mine]
    talks_done = [p for p in per_person if "D-ID talk" in p.message and "done" in p.message]
    assert sorted(p.person for p in talks_done) == list(range(1, count + 1))
    assert [p.done for p in talks_done] == list(range(1, count + 1)) and {p.total for p in talks_done} == {count}

    # One D-ID talk (and photo upload) per person, one audio upload shared by all.
    assert len(emulator_requests(did_emulator, "POST", "/talks")) == count
    assert len(emulator_requests(did_emulator, "POST", "/images")) == count
    assert len(emulator_requests(did_emulator, "POST", "/audios")) == 1

    response = response_of(finished(operations, op.name))
    assert response.persons_found == count
    assert [p.person for p in response.persons] == list(range(1, count + 1))
    assert all(p.state == jobs_pb2.JOB_STATE_SUCCEEDED and not p.HasField("error") for p in response.persons)
    scores = [p.score for p in response.persons]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.25
    assert len({(p.box.x1, p.box.y1, p.box.x2, p.box.y2) for p in response.persons}) == count
    assert len({p.did_talk_id for p in response.persons}) == count
    # The top-level fields describe the first person, as for a single-person video.
    assert response.video == response.persons[0].video and response.did_talk_id == response.persons[0].did_talk_id
    assert response.person_box == response.persons[0].box

    names = {a.name for a in response.artifacts}
    for person in response.persons:
        assert person.video.name == f"person-{person.person}.mp4" and person.video.name in names
        assert person.photo.name == f"person-{person.person}-matted.png" and person.photo.name in names
        video, first = download(jobs, op.name, person.video.name)
        assert first.sha256 == person.video.sha256
        assert_is_video(video)
        photo, _ = download(jobs, op.name, person.photo.name)
        rgba = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_UNCHANGED)
        assert rgba.ndim == 3 and rgba.shape[2] == 4  # the default background: the cut-out
        x1, y1, x2, y2 = person.box.x1, person.box.y1, person.box.x2, person.box.y2
        # The photo is this person's crop: its box grown by the 15 % margin (clamped).
        assert rgba.shape[1] >= x2 - x1 and rgba.shape[0] >= y2 - y1
        assert rgba.shape[1] <= (x2 - x1) * 1.3 + 2 and rgba.shape[0] <= (y2 - y1) * 1.3 + 2
    # The single-person names are not used.
    assert not names & {"talking_video.mp4", "person.png", "person.jpg"}


def test_max_persons_bounds_the_talks(jobs, operations, did_emulator) -> None:
    op = jobs.CreateTalkingVideo(talking_request("cloth-1.jpg", all_persons=True, max_persons=2, skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    detection = next(e.stage_update for e in events if e.stage_update.stage == S.JOB_STAGE_DETECTION_COMPLETE)
    assert "Detected 3 persons" in detection.message and "2 highest-scoring" in detection.message, detection.message
    response = response_of(finished(operations, op.name))
    assert response.persons_found == 3 and [p.person for p in response.persons] == [1, 2]
    assert len(emulator_requests(did_emulator, "POST", "/talks")) == 2
    # skip_matting: each person's plain crop, as JPEG.
    assert [p.photo.name for p in response.persons] == ["person-1-crop.jpg", "person-2-crop.jpg"]
    assert all(p.matting_skipped and "skip_matting" in p.matting_skipped_reason for p in response.persons)


@pytest.mark.parametrize(
    ("outcome", "error_class", "retried"),
    [("error", jobs_pb2.ERROR_CLASS_EXTERNAL, True), ("rejected", jobs_pb2.ERROR_CLASS_PERMANENT, False)],
)
def test_one_persons_failed_talk_keeps_the_others(jobs, operations, did_emulator, outcome, error_class, retried) -> None:
    # Person 2's talks all fail: each of the stage's 3 attempts makes one (an `error` retry needs a new talk).
    inject(did_emulator, talk_outcome=outcome, source_url="*/person-2-*", kind="FaceError", description="no face in person 2",
           times=3)
    op = jobs.CreateTalkingVideo(talking_request("zidane.jpg", all_persons=True, skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    values = percents(events)
    assert values == sorted(values), values

    retries = [e.error for e in events if e.WhichOneof("event") == "error"]
    if retried:  # D-ID's "error" may be transient: the stage is retried for person 2 only
        assert retries and all(r.will_retry and r.person == 2 and r.kind == "FaceError" for r in retries)
        assert all(r.description.startswith("person 2 of 2: ") for r in retries)
    else:  # a rejected talk is permanent: no retry
        assert not retries
    # A retry never polls person 2's failed talk again (it can only fail again): it makes a new
    # one, for person 2 only; person 1's talk is not made twice.
    talk_posts = emulator_requests(did_emulator, "POST", "/talks")
    assert len(talk_posts) == (4 if retried else 2)
    polled = {r["path"] for r in emulator_requests(did_emulator, "GET", "/talks/")}
    assert len(polled) == len(talk_posts)  # each talk polled under its own id
    complete = next(e.stage_update for e in events if e.stage_update.stage == S.JOB_STAGE_DID_COMPLETE)
    assert "done for 1 of 2 persons" in complete.message and "person 2 failed (FaceError" in complete.message

    response = response_of(finished(operations, op.name))
    first, second = response.persons
    assert first.state == jobs_pb2.JOB_STATE_SUCCEEDED and not first.HasField("error")
    assert second.state == jobs_pb2.JOB_STATE_FAILED and not second.HasField("video")
    assert second.error.kind == "FaceError" and "no face in person 2" in second.error.description
    assert second.error.error_class == error_class and second.error.person == 2
    assert second.error.stage == S.JOB_STAGE_DID_PROCESSING and not second.error.will_retry
    assert second.error.attempt == (3 if retried else 1)
    assert response.video == first.video
    video, _ = download(jobs, op.name, "person-1.mp4")
    assert_is_video(video)
    # The photo D-ID refused is kept, so the client can see what was sent; there is no video.
    download(jobs, op.name, second.photo.name)
    with pytest.raises(grpc.RpcError) as err:
        download(jobs, op.name, "person-2.mp4")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_persons_talk_failing_fails_the_operation_with_the_first_error(jobs, operations, did_emulator) -> None:
    inject(did_emulator, talk_outcome="rejected", source_url="*/person-*", times=2, kind="FaceError", description="no face")
    op = jobs.CreateTalkingVideo(talking_request("zidane.jpg", all_persons=True, skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    last = events[-1]
    assert last.WhichOneof("event") == "error" and not last.error.will_retry
    assert last.error.person == 1 and last.error.kind == "FaceError"
    assert last.error.error_class == jobs_pb2.ERROR_CLASS_PERMANENT
    assert last.error.description.startswith("person 1 of 2: ")
    op = finished(operations, op.name)
    assert op.WhichOneof("result") == "error" and op.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(emulator_requests(did_emulator, "POST", "/talks")) == 2


def test_a_person_index_beyond_the_persons_found_fails_fast(jobs, operations) -> None:
    # How many persons the photo holds is known only once the detector ran: the job fails at
    # detection, permanently, with INVALID_ARGUMENT and the count found.
    request = talking_request("zidane.jpg", person=jobs_pb2.PersonSelector(index=5))
    events = watch(jobs, jobs.CreateTalkingVideo(request, timeout=30).name)
    last = events[-1].error
    assert last.kind == "person_index_out_of_range" and last.error_class == jobs_pb2.ERROR_CLASS_PERMANENT
    assert "2 person(s) were found" in last.description and last.stage == S.JOB_STAGE_DETECTION_RUNNING
    op = finished(operations, events[-1].name)
    assert op.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_a_resubmitted_job_says_which_results_came_from_the_cache(tmp_path, triton: TritonProcess, did_emulator) -> None:
    """With the result cache on, the same photo again is detected and matted from the cache, and
    the events say so ("(cached)"), for the detection and for each person's matte."""
    orch = start_orchestrator(tmp_path, ["--triton-url", triton.url, *job_args(did_emulator), "--result-cache-bytes", "50000000"],
                              name="cached-jobs")
    try:
        with grpc.insecure_channel(orch.address) as channel:
            wait_until(lambda: health_status(channel) == health_pb2.HealthCheckResponse.SERVING, 60, "the orchestrator")
            jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
            runs = []
            for _ in range(2):
                events = watch(jobs, jobs.CreateTalkingVideo(talking_request("zidane.jpg", all_persons=True), timeout=30).name)
                assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
                runs.append(events)
        for events, cached in zip(runs, (False, True), strict=True):
            detection = next(e.stage_update for e in events if e.stage_update.stage == S.JOB_STAGE_DETECTION_COMPLETE)
            assert ("(cached)" in detection.message) is cached, detection.message
            mattes = [p for p in person_events(events) if "background removed" in p.message]
            assert [p.person for p in mattes] == [1, 2]
            assert all(("(cached)" in p.message) is cached for p in mattes), [p.message for p in mattes]
    finally:
        assert stop_process(orch.process) == 0, orch.log_text()[-3000:]
