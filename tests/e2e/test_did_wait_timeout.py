"""A D-ID talk that outlasts --did-wait-timeout: the wait fails as a recoverable TalkTimeout (an error
event with will_retry), the stage is retried and polls the same talk (one POST /talks), which then
finishes: the job SUCCEEDS. Its own orchestrator, for the short wait timeout."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from did_emulator import EmulatorHandle
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from tests.conftest import Orchestrator, TritonProcess, stop_process
from tests.e2e.test_job_worker import _serve
from tests.e2e.test_jobs import emulator_requests, inject, talking_request, watch

S = jobs_pb2.JobStage
WAIT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def short_wait(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, did_emulator: EmulatorHandle) -> Iterator[Orchestrator]:
    orch = _serve(tmp_path_factory.mktemp("short-wait"), triton, did_emulator, "--did-wait-timeout", str(WAIT_TIMEOUT_S), name="short-wait")
    yield orch
    stop_process(orch.process)


def test_a_talk_outlasting_the_wait_is_polled_again_not_recreated(short_wait: Orchestrator, did_emulator: EmulatorHandle) -> None:
    # The emulator's talk is "created" for 0.6 s, "started" for 0.6 s more, then rendered: never done within
    # the first 1 s wait, done well within the next one.
    httpx.post(f"{did_emulator.url}/_emulator/reset", timeout=5).raise_for_status()
    inject(did_emulator, talk_outcome="done", stage_delay_s=0.6)
    with grpc.insecure_channel(short_wait.address) as channel:
        jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
        op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
        events = watch(jobs, op.name)
    timeouts = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert timeouts and all(t.kind == "TalkTimeout" and t.will_retry for t in timeouts), timeouts
    assert timeouts[0].error_class == jobs_pb2.ERROR_CLASS_RECOVERABLE and timeouts[0].stage == S.JOB_STAGE_DID_PROCESSING
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert [r["status"] for r in emulator_requests(did_emulator, "POST", "/talks")] == [201]  # the same talk throughout
