"""A cluster behind the real load balancer (tests/cluster.py: PostgreSQL, one Triton, three
replicas, the D-ID emulator, HAProxy): any replica answers for any operation, the session key
pins calls to one replica, and a replica that drains or dies stops getting new calls."""

from __future__ import annotations

import collections
import hashlib
import json
import signal
import subprocess
import threading
import time

import grpc
import httpx
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from framewise.v1 import info_service_pb2, info_service_pb2_grpc, jobs_service_pb2_grpc
from framewise.v1 import jobs_service_pb2 as jobs_pb2
from tests.cluster import ClusterHandle, Replica, cluster, replica_answering  # noqa: F401 - the fixture
from tests.conftest import ASSETS, wait_until
from tests.e2e.test_cli import FRAMEWISE
from tests.unit.test_did import tone_wav
from tests.e2e.test_jobs import download, talking_request, upload

TIMEOUT_S = 120
KEYS = [f"session-{i}" for i in range(24)]


def info(channel: grpc.Channel) -> info_service_pb2.GetServerInfoResponse:
    return info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=10)


def placement(c: ClusterHandle, keys: list[str]) -> dict[str, str]:
    """Which replica answers each session key through the load balancer."""
    lb = c.channel()
    return {key: replica_answering(lb, key) for key in keys}


def test_each_replica_names_itself_and_lists_the_cluster(cluster: ClusterHandle) -> None:  # noqa: F811
    for replica in cluster.replicas:
        answer = info(cluster.channel(replica.address))
        assert answer.replica_id == replica.replica_id
    # Every replica registered itself in the shared store: each one lists them all, live.
    def all_listed() -> bool:
        listed = info(cluster.channel(cluster.replicas[0].address)).replicas
        return [(r.replica_id, r.address, r.live) for r in listed] == [(r.replica_id, r.address, True) for r in cluster.replicas]

    wait_until(all_listed, 15, "every replica to be listed as live")
    listed = info(cluster.channel(cluster.address)).replicas
    assert all(r.heartbeat_time.ToDatetime() >= r.register_time.ToDatetime() for r in listed)


def test_framewise_info_names_the_replica_that_answered_and_the_cluster(cluster: ClusterHandle) -> None:  # noqa: F811
    result = subprocess.run([FRAMEWISE, "--server", cluster.address, "info", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["replicaId"] in cluster.replica_ids
    assert [r["replicaId"] for r in answer["replicas"]] == cluster.replica_ids
    table = subprocess.run([FRAMEWISE, "--server", cluster.address, "info"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "(answered by replica replica-" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines() if line.startswith("replica-")]
    assert [(row[0], row[1], row[2]) for row in rows] == [(r.replica_id, r.address, "yes") for r in cluster.replicas]
    assert sum("<- answered" in line for line in table.stdout.splitlines()) == 1


def test_an_operation_submitted_through_one_replica_is_read_and_awaited_through_the_others(
    cluster: ClusterHandle,  # noqa: F811
) -> None:
    first, second, third = cluster.replicas
    submitted = jobs_service_pb2_grpc.JobServiceStub(cluster.channel(first.address)).CreateTalkingVideo(
        talking_request(skip_matting=True), timeout=30
    )
    name = submitted.name
    # Another replica and the load balancer know it at once (one shared store).
    for address in (second.address, cluster.address):
        got = operations_pb2_grpc.OperationsStub(cluster.channel(address)).GetOperation(
            operations_pb2.GetOperationRequest(name=name), timeout=10
        )
        assert got.name == name
    # Wait on a third replica until it is done.
    waiter = operations_pb2_grpc.OperationsStub(cluster.channel(third.address))
    deadline = time.monotonic() + TIMEOUT_S
    done = waiter.WaitOperation(operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=30)), timeout=40)
    while not done.done and time.monotonic() < deadline:
        done = waiter.WaitOperation(operations_pb2.WaitOperationRequest(name=name, timeout=duration_pb2.Duration(seconds=30)), timeout=40)
    assert done.done and done.HasField("response"), done
    # Listed through the load balancer, whichever replica answers.
    lb_ops = operations_pb2_grpc.OperationsStub(cluster.channel())
    for _ in range(3):
        listed = lb_ops.ListOperations(operations_pb2.ListOperationsRequest(name="operations", page_size=1000), timeout=10)
        assert name in [op.name for op in listed.operations]
    # The events of a job run elsewhere, read through the load balancer, are the whole history.
    events = [
        e
        for e in jobs_service_pb2_grpc.JobServiceStub(cluster.channel()).WatchOperation(
            jobs_pb2.WatchOperationRequest(name=name), timeout=30
        )
        if e.WhichOneof("event") != "heartbeat"
    ]
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].WhichOneof("event") == "complete"
    # Its artifact downloads the same through every replica and through the load balancer (one
    # shared storage root).
    videos = {
        address: download(jobs_service_pb2_grpc.JobServiceStub(cluster.channel(address)), name, "talking_video.mp4")[0]
        for address in [*(r.address for r in cluster.replicas), cluster.address]
    }
    assert len(set(videos.values())) == 1 and len(next(iter(videos.values()))) > 1000


def test_an_upload_through_one_replica_feeds_a_job_another_replica_runs(cluster: ClusterHandle) -> None:  # noqa: F811
    uploader = cluster.replicas[0]
    through_uploader = jobs_service_pb2_grpc.JobServiceStub(cluster.channel(uploader.address))
    audio = upload(through_uploader, tone_wav(0.5), jobs_pb2.FILE_KIND_AUDIO)
    image = upload(through_uploader, (ASSETS / "images" / "person.jpg").read_bytes(), jobs_pb2.FILE_KIND_IMAGE)
    # The uploader is frozen: it cannot claim the job, so another replica runs it.
    cluster.kill(uploader, signal.SIGSTOP)
    try:
        other = cluster.replicas[1]
        jobs = jobs_service_pb2_grpc.JobServiceStub(cluster.channel(other.address))
        submitted = jobs.CreateTalkingVideo(
            jobs_pb2.CreateTalkingVideoRequest(
                image_upload_id=image.upload_id, audio_upload_id=audio.upload_id, skip_matting=True
            ),
            timeout=30,
        )
        waiter = operations_pb2_grpc.OperationsStub(cluster.channel(other.address))
        deadline = time.monotonic() + TIMEOUT_S
        done = submitted
        while not done.done and time.monotonic() < deadline:
            done = waiter.WaitOperation(
                operations_pb2.WaitOperationRequest(name=submitted.name, timeout=duration_pb2.Duration(seconds=20)), timeout=30
            )
    finally:
        cluster.kill(uploader, signal.SIGCONT)
    assert done.done and done.HasField("response"), done
    meta = jobs_pb2.JobMetadata()
    done.metadata.Unpack(meta)
    assert meta.replica in cluster.replica_ids and meta.replica != uploader.replica_id
    cluster.wait_lb(uploader, "UP")


def test_a_session_key_pins_its_calls_to_one_replica_and_keys_spread(cluster: ClusterHandle) -> None:  # noqa: F811
    lb = cluster.channel()
    first = placement(cluster, KEYS)
    for _ in range(2):
        assert placement(cluster, KEYS) == first, "the same key must reach the same replica every time"
    per_replica = collections.Counter(first.values())
    # 24 keys over 3 replicas: each replica gets some (the hash spreads them).
    assert set(per_replica) == set(cluster.replica_ids), per_replica
    # Without the header the load balancer takes turns.
    assert {replica_answering(lb) for _ in range(9)} == set(cluster.replica_ids)


def _routed_around(cluster: ClusterHandle, victim: Replica, before: dict[str, str]) -> None:  # noqa: F811
    """With ``victim`` out: no new call reaches it, every call succeeds on the others, and only
    the session keys that hashed to it moved (consistent hashing)."""
    lb = cluster.channel()
    answered = [replica_answering(lb) for _ in range(12)]
    assert victim.replica_id not in answered and set(answered) == set(cluster.replica_ids) - {victim.replica_id}
    during = placement(cluster, KEYS)
    assert victim.replica_id not in during.values()
    moved = {k for k, r in before.items() if r == victim.replica_id}
    assert {k: r for k, r in during.items() if k not in moved} == {k: r for k, r in before.items() if k not in moved}


def _back(cluster: ClusterHandle, victim: Replica, before: dict[str, str]) -> None:  # noqa: F811
    cluster.restart(victim)
    cluster.wait_lb(victim, "UP")
    assert placement(cluster, KEYS) == before, "a replica that is back takes its keys again"


def _in_flight(replica: Replica, method: str) -> float:
    text = httpx.get(replica.metrics_url, timeout=5).text
    for line in text.splitlines():
        if line.startswith("framewise_rpc_in_flight{") and f'method="{method}"' in line and 'process=' not in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_draining_replica_is_not_serving_and_gets_no_new_calls(cluster: ClusterHandle) -> None:  # noqa: F811
    victim = cluster.replicas[1]
    before = placement(cluster, KEYS)
    assert victim.replica_id in before.values()
    # An upload in progress on the victim keeps its drain going (in-flight calls finish).
    data = (ASSETS / "images" / "person.jpg").read_bytes()
    gate = threading.Event()

    def messages():  # noqa: ANN202
        yield jobs_pb2.UploadFileRequest(
            header=jobs_pb2.UploadHeader(
                kind=jobs_pb2.FILE_KIND_IMAGE, filename="p.jpg", size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
        )
        gate.wait(30)
        yield jobs_pb2.UploadFileRequest(chunk=data)

    upload = jobs_service_pb2_grpc.JobServiceStub(cluster.channel(victim.address)).UploadFile.future(messages(), timeout=60)
    try:
        wait_until(lambda: _in_flight(victim, "/framewise.v1.JobService/UploadFile") >= 1, 10, "the upload to be in flight")
        cluster.kill(victim, signal.SIGTERM)
        # Draining: alive, NOT_SERVING on /healthz, and HAProxy takes it out.
        wait_until(lambda: victim.healthz() == 503, 10, "/healthz to say 503 while draining")
        cluster.wait_lb(victim, "DOWN")
        assert victim.process is not None and victim.process.poll() is None, "still draining, not gone"
        _routed_around(cluster, victim, before)
    finally:
        gate.set()
    assert upload.result(timeout=30).size_bytes == len(data), "the call in flight finished during the drain"
    _back(cluster, victim, before)


def test_a_killed_replica_gets_no_new_calls(cluster: ClusterHandle) -> None:  # noqa: F811
    victim = cluster.replicas[2]
    before = placement(cluster, KEYS)
    assert victim.replica_id in before.values()
    cluster.kill(victim, signal.SIGKILL)
    cluster.wait_lb(victim, "DOWN")
    _routed_around(cluster, victim, before)
    _back(cluster, victim, before)
    assert cluster.lb_status() == {r: "UP" for r in cluster.replica_ids}


def test_a_frozen_replica_is_taken_out_until_it_wakes(cluster: ClusterHandle) -> None:  # noqa: F811
    victim = cluster.replicas[0]
    before = placement(cluster, KEYS)
    cluster.kill(victim, signal.SIGSTOP)  # frozen: its port still accepts, nothing answers
    try:
        cluster.wait_lb(victim, "DOWN")  # /healthz checks time out
        _routed_around(cluster, victim, before)
    finally:
        cluster.kill(victim, signal.SIGCONT)
    cluster.wait_lb(victim, "UP")
    assert placement(cluster, KEYS) == before
