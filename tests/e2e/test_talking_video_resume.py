"""A talking video whose D-ID talk or uploads are gone when it resumes or retries goes back to the
upload stage (uploads again, creates one new talk) instead of failing as bad input; a talk that
D-ID ended in ``error`` is never polled again by the retry (a new talk is made); and with a D-ID
that kept its talks across its own restart (the emulator's state folder) the resumed job polls
the same talk and pays for no second one.

The real orchestrator (killed with kill -9 and restarted on the same store), real Triton, the D-ID
emulator. "D-ID forgot the talk and the uploads" is the emulator's reset: afterwards GET
/talks/{id} answers 404 and POST /talks with the old upload URLs answers 400, as the probe saw.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from did_emulator import EmulatorHandle, start_emulator
from framewise.v1 import jobs_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from tests.conftest import DID_API_KEY, TritonProcess, job_args, serving_orchestrator, stop_process, wait_until
from tests.e2e.test_jobs import emulator_requests, inject, talking_request, watch

S = jobs_pb2.JobStage

pytestmark = pytest.mark.usefixtures("fresh_emulator")


def forget_everything(did: EmulatorHandle) -> None:
    """D-ID no longer has the talks nor the uploads (expired, or lost): the emulator's reset."""
    httpx.post(f"{did.url}/_emulator/reset", timeout=5).raise_for_status()


def statuses(did: EmulatorHandle, method: str, prefix: str) -> list[int]:
    return [r["status"] for r in emulator_requests(did, method, prefix)]


def stage_events(events: list[jobs_pb2.WatchOperationResponse]) -> list[jobs_pb2.StageUpdate]:
    return [e.stage_update for e in events if e.WhichOneof("event") == "stage_update"]


def _watch_until_talk_created(channel: grpc.Channel, did: EmulatorHandle, name: str, talks: int = 1) -> list:
    stub = jobs_service_pb2_grpc.JobServiceStub(channel)
    seen = []
    stream = stub.WatchOperation(jobs_pb2.WatchOperationRequest(name=name), timeout=120)
    for event in stream:
        if event.WhichOneof("event") == "heartbeat":
            continue
        seen.append(event)
        if event.stage_update.stage == S.JOB_STAGE_DID_PROCESSING:
            break
    stream.cancel()
    wait_until(lambda: statuses(did, "POST", "/talks").count(201) == talks, 10, f"{talks} talk(s) to be created")
    time.sleep(0.3)  # the talk id is saved right after D-ID answers the POST
    return seen


def _finish(channel: grpc.Channel, name: str, after: int) -> list[jobs_pb2.WatchOperationResponse]:
    stub = jobs_service_pb2_grpc.JobServiceStub(channel)
    stream = stub.WatchOperation(jobs_pb2.WatchOperationRequest(name=name, after_sequence=after), timeout=180)
    return [e for e in stream if e.WhichOneof("event") != "heartbeat"]


def _response(channel: grpc.Channel, name: str) -> jobs_pb2.CreateTalkingVideoResponse:
    request = operations_pb2.GetOperationRequest(name=name)
    op = operations_pb2_grpc.OperationsStub(channel).GetOperation(request, timeout=10)
    assert op.done and op.WhichOneof("result") == "response", op.error
    response = jobs_pb2.CreateTalkingVideoResponse()
    assert op.response.Unpack(response)
    return response


@pytest.mark.timeout(300)
def test_killed_in_did_processing_and_the_talk_gone_goes_back_to_the_upload_stage(
    tmp_path: Path, triton: TritonProcess, fresh_emulator: EmulatorHandle
) -> None:
    did = fresh_emulator
    inject(did, talk_outcome="done", stage_delay_s=60)  # still rendering when the server dies
    orch = serving_orchestrator(tmp_path, ["--triton-url", triton.url, *job_args(did)], name="resume")
    with grpc.insecure_channel(orch.address) as channel:
        request = talking_request(skip_matting=True)
        op = jobs_service_pb2_grpc.JobServiceStub(channel).CreateTalkingVideo(request, timeout=30)
        before = _watch_until_talk_created(channel, did, op.name)
    orch.process.send_signal(signal.SIGKILL)
    orch.process.wait(timeout=30)
    listed = httpx.get(f"{did.url}/talks?limit=1", headers={"Authorization": f"Basic {DID_API_KEY}"}, timeout=5).json()
    old_talk = listed["talks"][0]["id"]
    forget_everything(did)

    restarted = serving_orchestrator(tmp_path, ["--triton-url", triton.url, *job_args(did)], name="resume")
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            rest = _finish(channel, op.name, before[-1].sequence)
            assert rest[-1].WhichOneof("event") == "complete", rest[-1]
            assert rest[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
            response = _response(channel, op.name)
    finally:
        assert stop_process(restarted.process) == 0, restarted.log_text()[-3000:]

    # The saved talk was asked for (404), the uploads made again, one new talk created and polled.
    assert f"/talks/{old_talk}" in [r["path"] for r in emulator_requests(did, "GET", "/talks/")]
    assert statuses(did, "POST", "/images") == [201] and statuses(did, "POST", "/audios") == [201]
    assert statuses(did, "POST", "/talks").count(201) == 1  # at most one live talk
    assert response.did_talk_id and response.did_talk_id != old_talk
    # The job said what happened: back to DID_UPLOAD, then DID_PROCESSING again; no permanent error.
    updates = stage_events(rest)
    back = [u for u in updates if u.stage == S.JOB_STAGE_DID_UPLOAD]
    assert back and "again" in back[0].message, [u.message for u in updates]
    assert [u.stage for u in updates].index(S.JOB_STAGE_DID_UPLOAD) < [u.stage for u in updates].index(
        S.JOB_STAGE_DID_COMPLETE
    )
    errors = [e.error for e in rest if e.WhichOneof("event") == "error"]
    assert all(e.will_retry and e.error_class != jobs_pb2.ERROR_CLASS_PERMANENT for e in errors), errors
    percents = [u.percent for u in updates]
    assert percents == sorted(percents), percents


@pytest.mark.timeout(300)
def test_both_restarted_with_d_id_keeping_its_talks_polls_the_same_talk(tmp_path: Path, triton: TritonProcess) -> None:
    # The orchestrator is killed with kill -9 and the emulator stopped while the talk renders;
    # the emulator comes back on the same port and state folder (as D-ID keeps its talks), the
    # orchestrator restarts: it polls the talk it saved, uploads nothing and creates no talk.
    state_dir = tmp_path / "did-state"
    first = start_emulator("127.0.0.1", 0, DID_API_KEY, stage_delay_s=0.05, state_dir=state_dir)
    port = first.server.server_address[1]
    second = None
    try:
        inject(first, talk_outcome="done", stage_delay_s=3.0)
        orch = serving_orchestrator(tmp_path, ["--triton-url", triton.url, *job_args(first)], name="both")
        with grpc.insecure_channel(orch.address) as channel:
            stub = jobs_service_pb2_grpc.JobServiceStub(channel)
            op = stub.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
            before = _watch_until_talk_created(channel, first, op.name)
        orch.process.send_signal(signal.SIGKILL)
        orch.process.wait(timeout=30)
        listed = httpx.get(f"{first.url}/talks?limit=1", headers={"Authorization": f"Basic {DID_API_KEY}"}, timeout=5)
        talk_id = listed.json()["talks"][0]["id"]
        first.stop()

        second = start_emulator("127.0.0.1", port, DID_API_KEY, stage_delay_s=0.05, state_dir=state_dir)
        assert second.url == first.url
        restarted = serving_orchestrator(tmp_path, ["--triton-url", triton.url, *job_args(second)], name="both")
        try:
            with grpc.insecure_channel(restarted.address) as channel:
                rest = _finish(channel, op.name, before[-1].sequence)
                assert rest[-1].WhichOneof("event") == "complete", rest[-1]
                assert rest[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
                response = _response(channel, op.name)
        finally:
            assert stop_process(restarted.process) == 0, restarted.log_text()[-3000:]
        assert response.did_talk_id == talk_id
        assert statuses(second, "POST", "/talks") == [] and statuses(second, "POST", "/images") == []
        assert statuses(second, "POST", "/audios") == []
        assert f"/talks/{talk_id}" in [r["path"] for r in emulator_requests(second, "GET", "/talks/")]
        assert not [e for e in rest if e.WhichOneof("event") == "error"]
        assert S.JOB_STAGE_DID_UPLOAD not in [u.stage for u in stage_events(rest)]
    finally:
        (second or first).stop()


@pytest.mark.parametrize("all_persons", [False, True])
def test_uploads_refused_while_running_are_made_again(jobs, operations, did_emulator, all_persons: bool) -> None:
    # D-ID forgets the talk(s) and the uploads while the job waits for them (no restart): the
    # job uploads again and makes new talks, one per person, instead of failing on the 400.
    talks = 2 if all_persons else 1
    for _ in range(talks):
        inject(did_emulator, talk_outcome="done", stage_delay_s=60)
    request = talking_request(skip_matting=True, all_persons=all_persons)
    op = jobs.CreateTalkingVideo(request, timeout=30)
    channel_events = []
    stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), timeout=120)
    for event in stream:
        channel_events.append(event)
        if event.stage_update.stage == S.JOB_STAGE_DID_PROCESSING:
            break
    stream.cancel()
    wait_until(lambda: statuses(did_emulator, "POST", "/talks").count(201) == talks, 10, "the talks to be created")
    time.sleep(0.3)
    forget_everything(did_emulator)
    events = watch(jobs, op.name, after=channel_events[-1].sequence)
    assert events[-1].WhichOneof("event") == "complete", events[-1]
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
    # After the reset: one audio upload, one photo per person, one new talk per person.
    assert statuses(did_emulator, "POST", "/audios") == [201]
    assert statuses(did_emulator, "POST", "/images") == [201] * talks
    assert statuses(did_emulator, "POST", "/talks").count(201) == talks


def test_a_talk_that_ended_in_error_is_retried_with_a_new_talk(jobs, did_emulator) -> None:
    # D-ID's `error` may be transient, so the stage is retried: with a new talk, never by polling
    # the failed one again (it can only answer `error` again).
    inject(did_emulator, talk_outcome="error", kind="RenderError", description="the renderer crashed", times=1)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    (retry,) = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert retry.kind == "RenderError" and retry.will_retry
    assert statuses(did_emulator, "POST", "/talks") == [201, 201]
    listed = httpx.get(
        f"{did_emulator.url}/talks?limit=2", headers={"Authorization": f"Basic {DID_API_KEY}"}, timeout=5
    ).json()["talks"]
    assert sorted(t["status"] for t in listed) == ["done", "error"]
    failed = next(t["id"] for t in listed if t["status"] == "error")
    log = httpx.get(f"{did_emulator.url}/_emulator/requests", timeout=5).json()["requests"]
    second_post = [i for i, r in enumerate(log) if (r["method"], r["path"]) == ("POST", "/talks")][1]
    assert not [r for r in log[second_post:] if r["path"] == f"/talks/{failed}"], "the failed talk was polled again"
