"""A job's lease across real replicas (tests/cluster.py: PostgreSQL, one Triton, replica
processes with their job workers, the D-ID emulator, HAProxy): the replica running a talking
video is killed (kill -9) while D-ID renders it, and another replica takes the job over once the
lease expired and completes it, with the one D-ID talk the first replica made."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import grpc
import httpx
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from tests.cluster import ClusterHandle, Replica, running_cluster
from tests.conftest import wait_until
from tests.test_jobs import talking_request

LEASE_S = 2.0
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, triton, postgres_server):  # noqa: ANN001, ANN201
    """Two replicas with a short job lease, so a takeover is quick."""
    with running_cluster(
        tmp_path_factory.mktemp("cluster"), triton.url, postgres_server.url, replicas=2,
        replica_args=["--job-lease", str(LEASE_S)],
    ) as handle:  # fmt: skip
        yield handle
        for replica in handle.replicas:  # a frozen one must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica.pid, signal.SIGCONT)


def metadata(op: operations_pb2.Operation) -> jobs_pb2.JobMetadata:
    meta = jobs_pb2.JobMetadata()
    assert op.metadata.Unpack(meta)
    return meta


def talk_posts(c: ClusterHandle) -> list[dict]:
    log = httpx.get(f"{c.emulator_url}/_emulator/requests", timeout=5).json()["requests"]
    return [r for r in log if r["method"] == "POST" and r["path"].startswith("/talks")]


def start_talk_and_find_its_replica(c: ClusterHandle) -> tuple[str, Replica, Replica]:
    """Submits a talking video through the load balancer and returns, once its D-ID talk exists
    and D-ID is rendering it, (operation name, the replica running it, the other replica)."""
    talks_before = len(talk_posts(c))
    # D-ID takes a while to render the next talk: the job sits in DID_PROCESSING meanwhile.
    httpx.post(
        f"{c.emulator_url}/_emulator/faults", json={"talk_outcome": "done", "stage_delay_s": 4}, timeout=5
    ).raise_for_status()
    lb = c.channel()
    jobs = jobs_service_pb2_grpc.JobServiceStub(lb)
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), timeout=TIMEOUT_S)
    for event in stream:
        if event.stage_update.stage == jobs_pb2.JOB_STAGE_DID_PROCESSING:
            break
    stream.cancel()
    running = operations_pb2_grpc.OperationsStub(lb).GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10)
    holder = c.replica(metadata(running).replica)
    (other,) = [r for r in c.replicas if r is not holder]
    # The talk exists (its id saved with the job) and D-ID is rendering it.
    wait_until(lambda: len(talk_posts(c)) == talks_before + 1, 30, "the job to create its D-ID talk")
    time.sleep(0.3)
    return op.name, holder, other


def wait_done(c: ClusterHandle, replica: Replica, name: str) -> operations_pb2.Operation:
    operations = operations_pb2_grpc.OperationsStub(c.channel(replica.address))
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        op = operations.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
        if op.done:
            return op
        assert time.monotonic() < deadline, f"the job did not finish: {metadata(op)}"
        time.sleep(0.2)


def assert_every_event_once(c: ClusterHandle, replica: Replica, name: str) -> None:
    """Every event once, in order, one terminal SUCCEEDED at the end, as read from ``replica``."""
    stream = jobs_service_pb2_grpc.JobServiceStub(c.channel(replica.address)).WatchOperation(
        jobs_pb2.WatchOperationRequest(name=name), timeout=TIMEOUT_S
    )
    events = [e for e in stream if e.WhichOneof("event") != "heartbeat"]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert [e.WhichOneof("event") for e in events].count("complete") == 1
    assert events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_a_replica_frozen_past_its_lease_loses_the_job_and_can_no_longer_write(cluster: ClusterHandle) -> None:
    talks_before = len(talk_posts(cluster))
    name, holder, survivor = start_talk_and_find_its_replica(cluster)
    cluster.kill(holder, signal.SIGSTOP)  # frozen: renews nothing, writes nothing, is not dead
    try:
        done = wait_done(cluster, survivor, name)
    finally:
        cluster.kill(holder, signal.SIGCONT)  # wakes up with the job it believes it holds
    meta = metadata(done)
    assert meta.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert meta.replica == survivor.replica_id
    # The woken replica's renewal and writes are refused; it drops the job without a trace.
    wait_until(lambda: "lease lost" in holder.log_text() or "job stopped" in holder.log_text(), 30,
               "the woken replica to notice it lost the job")  # fmt: skip
    time.sleep(1.0)  # anything it still tried to write would land now
    assert_every_event_once(cluster, survivor, name)
    after = operations_pb2_grpc.OperationsStub(cluster.channel(survivor.address)).GetOperation(
        operations_pb2.GetOperationRequest(name=name), timeout=10
    )
    assert metadata(after).last_sequence == meta.last_sequence and metadata(after).replica == survivor.replica_id
    assert len(talk_posts(cluster)) == talks_before + 1  # one D-ID talk
    cluster.wait_lb(holder, "UP")  # back in service for the next test


def test_kill_9_of_the_replica_running_a_talking_video_during_did(cluster: ClusterHandle) -> None:
    talks_before = len(talk_posts(cluster))
    name, holder, survivor = start_talk_and_find_its_replica(cluster)
    cluster.kill(holder, signal.SIGKILL)
    done = wait_done(cluster, survivor, name)
    meta = metadata(done)
    assert meta.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert meta.replica == survivor.replica_id  # taken over by the survivor
    assert len(talk_posts(cluster)) == talks_before + 1  # the same D-ID talk, polled again: never a second
    assert_every_event_once(cluster, survivor, name)
    video = b"".join(
        c.data
        for c in jobs_service_pb2_grpc.JobServiceStub(cluster.channel(survivor.address)).DownloadArtifact(
            jobs_pb2.DownloadArtifactRequest(name=name, artifact="talking_video.mp4"), timeout=60
        )
    )
    assert video[4:8] == b"ftyp"  # a real mp4, whichever replica stored it
    with pytest.raises(grpc.RpcError):  # the killed replica is gone
        operations_pb2_grpc.OperationsStub(cluster.channel(holder.address)).GetOperation(
            operations_pb2.GetOperationRequest(name=name), timeout=2
        )
