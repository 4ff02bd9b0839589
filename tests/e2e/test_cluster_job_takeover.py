"""A job's lease across real replicas (tests/cluster.py: PostgreSQL, one Triton, replica
processes with their job workers, the D-ID emulator, HAProxy): the replica running a talking
video is killed (kill -9) while D-ID renders it, and another replica takes the job over once the
lease expired and completes it, with the one D-ID talk the first replica made, while a watcher
through the load balancer and one on a third replica see every event once, in order, live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time

import grpc
import httpx
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc

from clients.sdk import FramewiseClient
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from tests.cluster import ClusterHandle, Replica, running_cluster
from tests.conftest import wait_until
from tests.e2e.test_jobs import talking_request

LEASE_S = 2.0
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, triton, postgres_server):  # noqa: ANN001, ANN201
    """Three replicas (the job's, the one taking it over, a watcher's) with a short job lease, so
    a takeover is quick."""
    with running_cluster(
        tmp_path_factory.mktemp("cluster"), triton.url, postgres_server.url, replicas=3,
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


def start_talk(c: ClusterHandle) -> str:
    """Submits a talking video through the load balancer, D-ID slow to render it; its name."""
    # D-ID takes a while to render the next talk: the job sits in DID_PROCESSING meanwhile.
    httpx.post(
        f"{c.emulator_url}/_emulator/faults", json={"talk_outcome": "done", "stage_delay_s": 4}, timeout=5
    ).raise_for_status()
    jobs = jobs_service_pb2_grpc.JobServiceStub(c.channel())
    return jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30).name


def find_its_replica(c: ClusterHandle, name: str, talks_before: int) -> tuple[Replica, list[Replica]]:
    """Once the job's D-ID talk exists and D-ID is rendering it: (the replica running it, the others)."""
    lb = c.channel()
    stream = jobs_service_pb2_grpc.JobServiceStub(lb).WatchOperation(
        jobs_pb2.WatchOperationRequest(name=name), timeout=TIMEOUT_S
    )
    for event in stream:
        if event.stage_update.stage == jobs_pb2.JOB_STAGE_DID_PROCESSING:
            break
    stream.cancel()
    running = operations_pb2_grpc.OperationsStub(lb).GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=10)
    holder = c.replica(metadata(running).replica)
    # The talk exists (its id saved with the job) and D-ID is rendering it.
    wait_until(lambda: len(talk_posts(c)) == talks_before + 1, 30, "the job to create its D-ID talk")
    time.sleep(0.3)
    return holder, [r for r in c.replicas if r is not holder]


class Watcher(threading.Thread):
    """A live WatchOperation stream on one address: every non-heartbeat event, with when it came;
    a stream that breaks (its replica died) ends with ``error`` set."""

    def __init__(self, c: ClusterHandle, address: str, name: str) -> None:
        super().__init__(daemon=True)
        self.stream = jobs_service_pb2_grpc.JobServiceStub(c.channel(address)).WatchOperation(
            jobs_pb2.WatchOperationRequest(name=name), timeout=TIMEOUT_S
        )
        self.events: list[jobs_pb2.WatchOperationResponse] = []
        self.received_at: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.stream:
                if event.WhichOneof("event") != "heartbeat":
                    self.events.append(event)
                    self.received_at.append(time.monotonic())
        except BaseException as exc:  # reported by the test
            self.error = exc


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


class SdkWatcher(threading.Thread):
    """``framewise``'s own watch (clients/jobs_sdk.py) through the load balancer, as a client
    runs it: it resumes with after_sequence by itself when the stream breaks. Its retries are
    recorded in ``cuts``."""

    def __init__(self, address: str, name: str) -> None:
        super().__init__(daemon=True)
        self.address, self.name = address, name
        self.events: list[jobs_pb2.WatchOperationResponse] = []
        self.received_at: list[float] = []
        self.cuts: list[BaseException] = []
        self.error: BaseException | None = None

    async def _watch(self) -> None:
        async with FramewiseClient(self.address, timeout_s=30) as client:
            retried = lambda attempt, error, delay_s: self.cuts.append(error)  # noqa: E731
            async for event in client.watch(self.name, heartbeats=False, backoff_s=0.1, on_retry=retried):
                self.events.append(event)
                self.received_at.append(time.monotonic())

    def run(self) -> None:
        try:
            asyncio.run(asyncio.wait_for(self._watch(), TIMEOUT_S))
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_a_replica_frozen_past_its_lease_loses_the_job_and_can_no_longer_write(cluster: ClusterHandle) -> None:
    talks_before = len(talk_posts(cluster))
    name = start_talk(cluster)
    holder, others = find_its_replica(cluster, name, talks_before)
    cluster.kill(holder, signal.SIGSTOP)  # frozen: renews nothing, writes nothing, is not dead
    try:
        done = wait_done(cluster, others[0], name)
    finally:
        cluster.kill(holder, signal.SIGCONT)  # wakes up with the job it believes it holds
    meta = metadata(done)
    assert meta.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    (survivor,) = [r for r in others if r.replica_id == meta.replica]  # taken over by another replica
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
    name = start_talk(cluster)
    # Watching live from the start: through the load balancer with the SDK (which resumes with
    # after_sequence if the replica it landed on is the one killed), and directly on every replica.
    through_lb = SdkWatcher(cluster.address, name)
    direct = {r.replica_id: Watcher(cluster, r.address, name) for r in cluster.replicas}
    for w in [through_lb, *direct.values()]:
        w.start()
    holder, others = find_its_replica(cluster, name, talks_before)
    cluster.kill(holder, signal.SIGKILL)
    killed_at = time.monotonic()
    done = wait_done(cluster, others[0], name)
    meta = metadata(done)
    assert meta.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert meta.replica in [r.replica_id for r in others]  # taken over by another replica
    assert len(talk_posts(cluster)) == talks_before + 1  # the same D-ID talk, polled again: never a second
    for survivor in others:
        assert_every_event_once(cluster, survivor, name)

    # The live watchers: the one on the replica running the job, then taking it over (the
    # survivor), the one on the third replica, and the load balancer's, each saw the whole
    # history exactly once, in order, the takeover's events included, as they happened.
    count = meta.last_sequence
    for where, w in [("lb", through_lb), *((r.replica_id, direct[r.replica_id]) for r in others)]:
        w.join(TIMEOUT_S)
        assert not w.is_alive(), f"{where}: the watch stream did not end"
        assert w.error is None, f"{where}: {w.error}"
        assert [e.sequence for e in w.events] == list(range(1, count + 1)), where
        assert [e.WhichOneof("event") for e in w.events].count("complete") == 1, where
        assert w.events[-1].complete.state == jobs_pb2.JOB_STATE_SUCCEEDED, where
        assert w.received_at[-1] > killed_at, f"{where}: the end was not received live"
    # The stream on the killed replica broke; what it had received was a gapless prefix.
    cut = direct[holder.replica_id]
    cut.join(10)
    assert [e.sequence for e in cut.events] == list(range(1, len(cut.events) + 1))
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
