"""Seed 003's graceful degradation, with a real outage: matting is not served (a Triton whose
repository holds every model but `matting`), so background removal fails through its retries and the talking
video goes on with the plain crop, saying so in the stage message and the result; with
require_matting the same job fails instead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2

from did_emulator import EmulatorHandle
from framewise.v1 import common_pb2
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from server.triton.launcher import TritonPorts
from tests.conftest import Orchestrator, TritonProcess, free_port, health_status, stop_process
from tests.e2e.test_job_worker import _serve
from tests.e2e.test_jobs import TALKING_STAGES, stages, talking_request, watch

S = jobs_pb2.JobStage


@pytest.fixture(scope="module")
def without_matting(tmp_path_factory: pytest.TempPathFactory, cpu_repository: Path) -> Iterator[TritonProcess]:
    repository = tmp_path_factory.mktemp("no-matting")
    for model in cpu_repository.iterdir():
        if model.is_dir() and model.name != "matting":
            (repository / model.name).symlink_to(model, target_is_directory=True)
    triton = TritonProcess(repository, tmp_path_factory.mktemp("triton-no-matting"), TritonPorts(free_port(), free_port(), free_port()))
    triton.start()
    yield triton
    triton.stop()


@pytest.fixture(scope="module")
def degraded(tmp_path_factory: pytest.TempPathFactory, without_matting: TritonProcess, did_emulator: EmulatorHandle) -> Iterator[Orchestrator]:
    # _serve waits for the JobService to report SERVING: matting is not among the models it needs.
    orch = _serve(tmp_path_factory.mktemp("degraded"), without_matting, did_emulator, name="degraded")
    yield orch
    stop_process(orch.process)


def test_health_shows_the_outage_where_it_bites(degraded: Orchestrator) -> None:
    with grpc.insecure_channel(degraded.address) as channel:
        assert health_status(channel, "framewise.v1.JobService") == health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel, "framewise.v1.VisionService") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING  # the whole server: a model is down
    assert "models not ready: matting" in degraded.log_text()  # named in the logged reason


def test_matting_outage_degrades_to_the_plain_crop(degraded: Orchestrator) -> None:
    with grpc.insecure_channel(degraded.address) as channel:
        jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
        op = jobs.CreateTalkingVideo(talking_request(), timeout=30)
        events = watch(jobs, op.name)
        done = operations_pb2_grpc.OperationsStub(channel).GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)

    seen = stages(events)
    # Every stage in order, as a job that removed the background; each of the 3 matting attempts starts its stage again.
    assert [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]] == TALKING_STAGES
    assert seen.count((S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING, 50)) == 3
    retries = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert len(retries) == 2 and all(r.will_retry and r.stage == S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING for r in retries)
    (removal,) = [e.stage_update for e in events if e.WhichOneof("event") == "stage_update"
                  and e.stage_update.stage == S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE]
    assert "background removal failed" in removal.message and "continuing without it" in removal.message
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert done.response.Unpack(response)
    assert response.matting_skipped and "background removal failed" in response.matting_skipped_reason
    assert "model 'matting' is not ready" in response.matting_skipped_reason
    assert {a.name for a in response.artifacts} == {"talking_video.mp4", "person.jpg"}  # the crop, not a cut-out


def test_require_matting_fails_the_job_instead(degraded: Orchestrator) -> None:
    with grpc.insecure_channel(degraded.address) as channel:
        jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
        op = jobs.CreateTalkingVideo(talking_request(require_matting=True), timeout=30)
        events = watch(jobs, op.name)
    last = events[-1]
    assert last.WhichOneof("event") == "error" and not last.error.will_retry
    assert last.error.stage == S.JOB_STAGE_BACKGROUND_REMOVAL_RUNNING and last.error.attempt == 3
    assert S.JOB_STAGE_DID_UPLOAD not in [s for s, _ in stages(events)]


def test_a_skipped_matting_says_why(degraded: Orchestrator) -> None:
    with grpc.insecure_channel(degraded.address) as channel:
        jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
        op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
        events = watch(jobs, op.name)
        done = operations_pb2_grpc.OperationsStub(channel).GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert not [e for e in events if e.WhichOneof("event") == "error"]  # matting never ran: nothing failed
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert done.response.Unpack(response)
    assert response.matting_skipped and response.matting_skipped_reason == "skipped at the client's request (skip_matting)"


def test_all_persons_degrade_together_and_the_background_applied_says_so(degraded: Orchestrator) -> None:
    # A colour background needs the matte: without it every person's plain crop is sent, and each
    # person's result says the original pixels (KEEP) went to D-ID, and why.
    background = common_pb2.Background(mode=common_pb2.BACKGROUND_MODE_COLOR, color="white")
    with grpc.insecure_channel(degraded.address) as channel:
        jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
        op = jobs.CreateTalkingVideo(talking_request(all_persons=True, background=background), timeout=30)
        events = watch(jobs, op.name)
        done = operations_pb2_grpc.OperationsStub(channel).GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    retries = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert len(retries) == 2 and all(r.person == 1 and r.description.startswith("person 1 of 2: ") for r in retries)
    (removal,) = [e.stage_update for e in events if e.WhichOneof("event") == "stage_update"
                  and e.stage_update.stage == S.JOB_STAGE_BACKGROUND_REMOVAL_COMPLETE]
    assert "continuing without it for person 1, 2" in removal.message, removal.message
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert done.response.Unpack(response)
    assert [p.photo.name for p in response.persons] == ["person-1-crop.jpg", "person-2-crop.jpg"]
    for person in response.persons:
        assert person.state == jobs_pb2.JOB_STATE_SUCCEEDED and person.matting_skipped
        assert "background removal failed" in person.matting_skipped_reason
        assert person.background.mode == common_pb2.BACKGROUND_MODE_KEEP
