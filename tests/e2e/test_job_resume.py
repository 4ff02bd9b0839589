"""kill -9 in the middle of a job, restart on the same store: the job finishes, and a watcher
that resumes with after_sequence sees every event exactly once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from did_emulator import EmulatorHandle
from framewise.v1 import common_pb2, jobs_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from tests.conftest import (
    Orchestrator,
    TritonProcess,
    job_args,
    serving_orchestrator,
    stop_process,
    wait_until,
)
from tests.unit.test_did import tone_wav
from tests.e2e.test_jobs import ASSETS, emulator_requests, inject

S = jobs_pb2.JobStage


def _serve(tmp: Path, triton: TritonProcess, did: EmulatorHandle) -> Orchestrator:
    # The same name means the same job store and storage folder as the process before it.
    return serving_orchestrator(tmp, ["--triton-url", triton.url, *job_args(did)], name="crashy")


def _watch_until(channel: grpc.Channel, name: str, predicate) -> list[jobs_pb2.WatchOperationResponse]:
    stub = jobs_service_pb2_grpc.JobServiceStub(channel)
    seen = []
    stream = stub.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), timeout=120)
    for event in stream:
        if event.WhichOneof("event") == "heartbeat":
            continue
        seen.append(event)
        if predicate(event):
            break
    stream.cancel()
    return seen


def _kill_restart_and_finish(
    tmp: Path, triton: TritonProcess, did: EmulatorHandle, orch: Orchestrator, name: str, before: list
) -> list[jobs_pb2.WatchOperationResponse]:
    orch.process.send_signal(signal.SIGKILL)
    orch.process.wait(timeout=30)
    restarted = _serve(tmp, triton, did)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            after = before[-1].sequence
            stub = jobs_service_pb2_grpc.JobServiceStub(channel)
            stream = stub.WatchOperation(jobs_pb2.WatchOperationRequest(name=name, after_sequence=after), timeout=180)
            rest = [e for e in stream if e.WhichOneof("event") != "heartbeat"]
            everything = before + rest
            assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
            # A fresh watcher sees the same history, stored before anyone saw it.
            replay = [e for e in stub.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), timeout=60)]
            assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in everything]
            op = operations_pb2_grpc.OperationsStub(channel).GetOperation(
                operations_pb2.GetOperationRequest(name=name), timeout=10
            )
            assert op.done and op.WhichOneof("result") == "response", op
            return everything
    finally:
        assert stop_process(restarted.process) == 0, restarted.log_text()[-3000:]


def _talking_video_killed_mid_talk(
    tmp: Path, triton: TritonProcess, did: EmulatorHandle, talks: int, **fields: object
) -> list[jobs_pb2.WatchOperationResponse]:
    """A talking video killed with kill -9 while D-ID renders its `talks` talks (2 s each), then
    restarted on the same store and followed to the end: every event, across the crash."""
    for _ in range(talks):
        inject(did, talk_outcome="done", stage_delay_s=2.0)
    orch = _serve(tmp, triton, did)
    with grpc.insecure_channel(orch.address) as channel:
        request = jobs_pb2.CreateTalkingVideoRequest(
            image=(ASSETS / "images" / "zidane.jpg").read_bytes(), audio=tone_wav(1.0), **fields
        )
        op = jobs_service_pb2_grpc.JobServiceStub(channel).CreateTalkingVideo(request, timeout=30)
        before = _watch_until(channel, op.name, lambda e: e.stage_update.stage == S.JOB_STAGE_DID_PROCESSING)
    # A talk exists (and its id is stored) once D-ID answered its POST.
    wait_until(lambda: len(emulator_requests(did, "POST", "/talks")) == talks, 10, f"{talks} talk(s) to be created")
    time.sleep(0.3)
    return _kill_restart_and_finish(tmp, triton, did, orch, op.name, before)


def test_talking_video_survives_kill_9_and_polls_the_same_talk(tmp_path, triton, fresh_emulator) -> None:
    events = _talking_video_killed_mid_talk(tmp_path, triton, fresh_emulator, talks=1)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert len(emulator_requests(fresh_emulator, "POST", "/talks")) == 1, "the resumed job paid for a second talk"
    # Stages completed before the crash did not run again.
    stage_names = [e.stage_update.stage for e in events if e.WhichOneof("event") == "stage_update"]
    assert stage_names.count(S.JOB_STAGE_DETECTION_RUNNING) == 1
    assert stage_names.count(S.JOB_STAGE_DID_PROCESSING) == 2  # cut off once, then resumed
    assert stage_names[-1] == S.JOB_STAGE_COMPLETED


def test_all_persons_talking_video_survives_kill_9_and_pays_no_second_talk(tmp_path, triton, fresh_emulator) -> None:
    """The same for a video per person: each person's talk id is saved the moment the talk exists,
    so the resumed job polls both talks and creates none."""
    events = _talking_video_killed_mid_talk(tmp_path, triton, fresh_emulator, talks=2, all_persons=True)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert len(emulator_requests(fresh_emulator, "POST", "/talks")) == 2, "the resumed job paid for a second talk"
    assert len(emulator_requests(fresh_emulator, "POST", "/images")) == 2  # the uploads were not redone either
    updates = [e for e in events if e.WhichOneof("event") in ("stage_update", "progress_update")]
    percents = [getattr(e, e.WhichOneof("event")).percent for e in updates]
    assert percents == sorted(percents), percents  # monotone across the crash too
    done = [e.progress_update.person for e in updates if e.progress_update.message.endswith(" bytes)")]
    assert sorted(done) == [1, 2]
    stage_names = [e.stage_update.stage for e in events if e.WhichOneof("event") == "stage_update"]
    assert stage_names.count(S.JOB_STAGE_DETECTION_RUNNING) == 1
    assert stage_names.count(S.JOB_STAGE_DID_PROCESSING) == 2  # cut off once, then resumed


@pytest.mark.timeout(300)
def test_video_segmentation_survives_kill_9_mid_tracking(tmp_path, triton, did_emulator) -> None:
    orch = _serve(tmp_path, triton, did_emulator)
    with grpc.insecure_channel(orch.address) as channel:
        request = jobs_pb2.SegmentVideoRequest(
            server_path="bedroom.mp4", box=common_pb2.BoundingBox(x1=100, y1=100, x2=300, y2=300), max_frames=40
        )
        op = jobs_service_pb2_grpc.JobServiceStub(channel).SegmentVideo(request, timeout=60)
        before = _watch_until(channel, op.name, lambda e: e.WhichOneof("event") == "progress_update")
    events = _kill_restart_and_finish(tmp_path, triton, did_emulator, orch, op.name, before)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    stage_names = [e.stage_update.stage for e in events if e.WhichOneof("event") == "stage_update"]
    assert stage_names.count(S.JOB_STAGE_DECODING) == 1
    assert stage_names.count(S.JOB_STAGE_TRACKING) == 2
