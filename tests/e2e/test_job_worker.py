"""The job worker process (--job-process worker, the default): jobs run in a child of the
serving process at a lower CPU priority; a worker killed mid-job is started again and the job
finishes with every event once; a serving process killed with -9 takes its worker with it;
the worker's metrics reach /metrics; --job-process inline still runs jobs in-process."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import grpc
import httpx
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from did_emulator import EmulatorHandle
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from server.metrics import WithChildMetrics
from tests.conftest import (
    JOB_WORKER,
    Orchestrator,
    TritonProcess,
    child_pids,
    health_status,
    job_args,
    niceness,
    pid_alive,
    start_orchestrator,
    stop_process,
    wait_until,
)
from tests.e2e.test_jobs import TALKING_STAGES, assert_contiguous, emulator_requests, inject, stages, talking_request, watch

S = jobs_pb2.JobStage


def _serve(tmp: Path, triton: TritonProcess, did: EmulatorHandle, *extra: str, name: str = "worker") -> Orchestrator:
    orch = start_orchestrator(tmp, ["--triton-url", triton.url, *job_args(did), *extra], name=name)
    with grpc.insecure_channel(orch.address) as channel:
        try:
            wait_until(
                lambda: (
                    health_status(channel, jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name)
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                60,
                "the job service to serve",
            )
        except AssertionError:
            stop_process(orch.process)
            raise AssertionError(orch.log_text()[-3000:]) from None
    return orch


def _worker_of(orch: Orchestrator) -> int:
    pids: list[int] = []
    wait_until(
        lambda: bool(pids.extend(child_pids(orch.process.pid, JOB_WORKER)) or pids), 30, "the job worker process"
    )
    assert len(set(pids)) == 1, pids
    return pids[0]


def _job_state(tmp: Path, name: str) -> str:
    state = tmp / "worker-storage" / "processed" / name.rsplit("/", 1)[-1] / "work" / "state.json"
    return state.read_text() if state.exists() else ""


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url, timeout=5).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    values = [
        float(m.group(1))
        for line in text.splitlines()
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items())
        for m in [re.search(r" ([0-9.e+-]+)$", line)]
        if m
    ]
    assert len(values) <= 1, (name, wanted, values)
    return values[0] if values else 0.0


def test_jobs_run_in_a_niced_worker_whose_metrics_reach_the_metrics_endpoint(orchestrator, channel) -> None:
    worker = _worker_of(orchestrator)
    assert niceness(worker) == 10 and niceness(orchestrator.process.pid) == 0
    before = _metric(
        orchestrator.metrics_url,
        "framewise_triton_request_latency_seconds_count",
        model="yolov8",
        outcome="ok",
        process="job_worker",
    )
    jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    events = watch(jobs, op.name)
    assert_contiguous(events)
    assert stages(events) == TALKING_STAGES
    # The detection ran in the worker: its Triton request is counted under process="job_worker"
    # (pushed to the serving process every 2 s), beside the serving process's own samples.
    wait_until(
        lambda: (
            _metric(
                orchestrator.metrics_url,
                "framewise_triton_request_latency_seconds_count",
                model="yolov8",
                outcome="ok",
                process="job_worker",
            )
            >= before + 1
        ),
        15,
        "the worker's yolov8 request in /metrics",
    )
    assert child_pids(orchestrator.process.pid, JOB_WORKER) == [worker]


def test_a_killed_worker_is_restarted_and_its_job_finishes_with_every_event_once(
    tmp_path, triton, did_emulator
) -> None:
    httpx.post(f"{did_emulator.url}/_emulator/reset", timeout=5).raise_for_status()
    inject(did_emulator, talk_outcome="done", stage_delay_s=2.0)
    orch = _serve(tmp_path, triton, did_emulator)
    try:
        worker = _worker_of(orch)
        with grpc.insecure_channel(orch.address) as channel:
            jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
            op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
            # One stream, open across the worker's death: the serving process keeps it.
            stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), timeout=120)
            events = []
            for event in stream:
                if event.WhichOneof("event") == "heartbeat":
                    continue
                events.append(event)
                if event.stage_update.stage == S.JOB_STAGE_DID_PROCESSING and pid_alive(worker):
                    # Killed once the talk's id is saved: the resumed job must poll that talk.
                    wait_until(lambda: "did_talk_id" in _job_state(tmp_path, op.name), 10, "the talk id to be saved")
                    os.kill(worker, signal.SIGKILL)
            assert_contiguous(events)
            assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
            stage_names = [e.stage_update.stage for e in events if e.WhichOneof("event") == "stage_update"]
            assert stage_names.count(S.JOB_STAGE_DETECTION_RUNNING) == 1  # completed stages did not run again
            assert stage_names.count(S.JOB_STAGE_DID_PROCESSING) == 2  # cut off once, then resumed
            assert len(emulator_requests(did_emulator, "POST", "/talks")) == 1, "the resumed job paid for a second talk"
            op = operations_pb2_grpc.OperationsStub(channel).GetOperation(
                operations_pb2.GetOperationRequest(name=op.name), timeout=10
            )
            assert op.done and op.WhichOneof("result") == "response"
        restarted = _worker_of(orch)
        assert restarted != worker and niceness(restarted) == 10
        assert "job worker process down; restarting it" in orch.log_text()
    finally:
        assert stop_process(orch.process) == 0, orch.log_text()[-3000:]
    assert not child_pids(orch.process.pid, JOB_WORKER)


def test_kill_9_of_the_serving_process_takes_its_worker_with_it(tmp_path, triton, did_emulator) -> None:
    orch = _serve(tmp_path, triton, did_emulator)
    worker = _worker_of(orch)
    orch.process.send_signal(signal.SIGKILL)
    orch.process.wait(timeout=30)
    wait_until(lambda: not pid_alive(worker), 10, "the orphaned worker to die")


def test_inline_job_process_runs_jobs_in_the_serving_process(tmp_path, triton, did_emulator) -> None:
    orch = _serve(tmp_path, triton, did_emulator, "--job-process", "inline", name="inline")
    try:
        with grpc.insecure_channel(orch.address) as channel:
            jobs = jobs_service_pb2_grpc.JobServiceStub(channel)
            events = watch(jobs, jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30).name)
            assert stages(events) == TALKING_STAGES and events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED
        assert not child_pids(orch.process.pid, JOB_WORKER)
        assert 'process="job_worker"' not in httpx.get(orch.metrics_url, timeout=5).text
    finally:
        assert stop_process(orch.process) == 0, orch.log_text()[-3000:]


def test_worker_metrics_merge_into_the_serving_process_families() -> None:
    registry = CollectorRegistry()
    Counter("framewise_jobs_total", "Jobs.", ["kind"], registry=registry).labels("talking").inc(2)
    child = CollectorRegistry()
    Counter("framewise_jobs_total", "Jobs.", ["kind"], registry=child).labels("talking").inc(5)
    Gauge("framewise_only_in_worker", "Worker only.", registry=child).set(7)
    merged = WithChildMetrics(registry, lambda: generate_latest(child), "job_worker")
    text = generate_latest(merged).decode()
    assert text.count("# TYPE framewise_jobs_total counter") == 1, text
    assert 'framewise_jobs_total{kind="talking"} 2.0' in text
    assert 'framewise_jobs_total{kind="talking",process="job_worker"} 5.0' in text
    assert 'framewise_only_in_worker{process="job_worker"} 7.0' in text
    # Before the worker's first push there is nothing to merge.
    assert generate_latest(WithChildMetrics(registry, lambda: b"", "job_worker")) == generate_latest(registry)
    restricted = generate_latest(merged.restricted_registry(["framewise_only_in_worker"])).decode()
    assert "framewise_only_in_worker" in restricted and "framewise_jobs_total" not in restricted


@pytest.fixture(autouse=True)
def _reset_emulator(did_emulator: EmulatorHandle):
    httpx.post(f"{did_emulator.url}/_emulator/reset", timeout=5).raise_for_status()
    yield
