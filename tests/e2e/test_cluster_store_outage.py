"""The shared job store (PostgreSQL) going down and coming back under a running cluster
(tests/cluster.py: a PostgreSQL of the cluster's own, one Triton, replica processes with their
job workers, the D-ID emulator, HAProxy): while it is down JobService is NOT_SERVING on every
replica and job calls through the load balancer fail fast with UNAVAILABLE; once it is back
every replica serves again by itself and the running talking video completes, its history
without a duplicate or a gap, with one D-ID talk."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from grpc_health.v1 import health_pb2

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from server.services import SERVICES
from tests.cluster import ClusterHandle, ClusterPostgres, running_cluster
from tests.conftest import health_status, wait_until
from tests.e2e.test_jobs import talking_request

JOB_SERVICE = SERVICES["jobs"].full_name
TIMEOUT_S = 120
CALL_DEADLINE_S = 20.0
# Fast means the replica answered from what it knows (the store is down) instead of waiting on a
# connection: far under the call's deadline, with room for a loaded test machine.
FAIL_FAST_S = 5.0
LEASE_S = 20.0
SHORT_LEASE_S = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, triton) -> Iterator[ClusterHandle]:  # noqa: ANN001
    """Two replicas on a PostgreSQL of their own (this test stops it). The job lease outlasts the
    outage (about 5 s here), as a production lease outlasts a database restart: the job stays
    with its replica, which goes on once the store is back."""
    with (
        ClusterPostgres() as postgres,
        running_cluster(
            tmp_path_factory.mktemp("cluster"), triton.url, postgres.url, replicas=2,
            replica_args=["--job-lease", str(LEASE_S)], postgres=postgres,
        ) as handle,
    ):  # fmt: skip
        yield handle


def talk_posts(c: ClusterHandle) -> list[dict]:
    log = httpx.get(f"{c.emulator_url}/_emulator/requests", timeout=5).json()["requests"]
    return [r for r in log if r["method"] == "POST" and r["path"].startswith("/talks")]


def job_health(c: ClusterHandle) -> dict[str, int | None]:
    return {r.replica_id: health_status(c.channel(r.address), JOB_SERVICE) for r in c.replicas}


def get_operation(c: ClusterHandle, name: str) -> operations_pb2.Operation:
    return operations_pb2_grpc.OperationsStub(c.channel()).GetOperation(
        operations_pb2.GetOperationRequest(name=name), timeout=CALL_DEADLINE_S
    )


def assert_fails_fast_unavailable(call) -> None:  # noqa: ANN001 - a no-argument gRPC call
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        call()
    elapsed = time.monotonic() - started
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f} s of a {CALL_DEADLINE_S:g} s deadline"
    assert "job store" in (raised.value.details() or ""), raised.value.details()


def talk_rendering_in_did(c: ClusterHandle, render_s: float) -> operations_pb2.Operation:
    """A talking video submitted through the load balancer, returned once it waits on D-ID,
    which renders each stage of its talk for ``render_s``."""
    httpx.post(
        f"{c.emulator_url}/_emulator/faults", json={"talk_outcome": "done", "stage_delay_s": render_s}, timeout=5
    ).raise_for_status()
    jobs = jobs_service_pb2_grpc.JobServiceStub(c.channel())
    # (/healthz, which the cluster waited for, does not include JobService: its job worker may still start.)
    wait_until(
        lambda: set(job_health(c).values()) == {health_pb2.HealthCheckResponse.SERVING},
        60, "JobService SERVING on every replica",
    )  # fmt: skip
    op = jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    stream = jobs.WatchOperation(jobs_pb2.WatchOperationRequest(name=op.name), timeout=TIMEOUT_S)
    for event in stream:
        if event.stage_update.stage == jobs_pb2.JOB_STAGE_DID_PROCESSING:
            break
    stream.cancel()
    return op


def test_postgres_down_turns_jobs_not_serving_everywhere_and_everything_recovers(cluster: ClusterHandle) -> None:
    talks_before = len(talk_posts(cluster))
    jobs = jobs_service_pb2_grpc.JobServiceStub(cluster.channel())
    op = talk_rendering_in_did(cluster, 3)  # the job is mid-D-ID when the store goes away

    cluster.stop_postgres()
    try:
        stopped = time.monotonic()
        wait_until(
            lambda: set(job_health(cluster).values()) == {health_pb2.HealthCheckResponse.NOT_SERVING},
            10, "JobService NOT_SERVING on every replica",
        )  # fmt: skip
        noticed_s = time.monotonic() - stopped
        assert_fails_fast_unavailable(lambda: get_operation(cluster, op.name))
        assert_fails_fast_unavailable(
            lambda: jobs.CreateTalkingVideo(talking_request(skip_matting=True), timeout=CALL_DEADLINE_S)
        )
        # Still NOT_SERVING while it stays down (no flapping back on a failed probe).
        time.sleep(3)
        assert set(job_health(cluster).values()) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    finally:
        cluster.start_postgres()
    assert noticed_s < 10

    wait_until(
        lambda: set(job_health(cluster).values()) == {health_pb2.HealthCheckResponse.SERVING},
        30, "JobService SERVING again on every replica",
    )  # fmt: skip
    done = wait_done(cluster, op.name)
    assert_succeeded_once(cluster, done, talks_before)


def wait_done(c: ClusterHandle, name: str) -> operations_pb2.Operation:
    deadline = time.monotonic() + TIMEOUT_S
    while not (done := get_operation(c, name)).done:
        assert time.monotonic() < deadline, "the job did not finish after the store came back"
        time.sleep(0.2)
    return done


def assert_succeeded_once(c: ClusterHandle, done: operations_pb2.Operation, talks_before: int) -> None:
    """SUCCEEDED, the same gapless history read from every replica, one D-ID talk."""
    meta = jobs_pb2.JobMetadata()
    assert done.metadata.Unpack(meta)
    assert meta.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    for replica in c.replicas:  # the same history, read from every replica
        events = [
            e
            for e in jobs_service_pb2_grpc.JobServiceStub(c.channel(replica.address)).WatchOperation(
                jobs_pb2.WatchOperationRequest(name=done.name), timeout=TIMEOUT_S
            )
            if e.WhichOneof("event") != "heartbeat"
        ]
        assert [e.sequence for e in events] == list(range(1, meta.last_sequence + 1)), replica.replica_id
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds.count("complete") == 1 and kinds[-1] == "complete", kinds
        # No event written twice (a retried write committed once, not again after the outage).
        payloads = [e.SerializeToString() for e in events]
        assert len(payloads) == len(set(payloads))
    assert len(talk_posts(c)) == talks_before + 1  # one D-ID talk, whatever the outage


@pytest.fixture(scope="module")
def short_lease_cluster(tmp_path_factory, triton) -> Iterator[ClusterHandle]:  # noqa: ANN001
    """One replica whose job lease (SHORT_LEASE_S) is far shorter than the outage below: the
    lease lapses while its holder is cut off from the store, and when the store is back the
    replica still running the job is the only claimer there is."""
    with (
        ClusterPostgres() as postgres,
        running_cluster(
            tmp_path_factory.mktemp("cluster"), triton.url, postgres.url, replicas=1,
            # Renewed late in the lease: once the store is back, the lanes (woken by the store's
            # reconnection) usually look for work before the renewer's next turn.
            replica_args=["--job-lease", str(SHORT_LEASE_S), "--job-lease-renew", str(SHORT_LEASE_S * 0.8)],
            postgres=postgres,
        ) as handle,
    ):  # fmt: skip
        yield handle


def test_an_outage_longer_than_the_lease_leaves_the_job_with_its_running_replica(short_lease_cluster: ClusterHandle) -> None:
    """The replica's lanes used to claim its own lapsed job again (epoch + 1) while the first run
    was alive: the worker knew the job by name only, ignored the second run and stopped the
    first at its fenced write, and the job stayed RUNNING for ever under a renewed lease. Now
    the running replica renews the lapsed lease and finishes the job."""
    c = short_lease_cluster
    talks_before = len(talk_posts(c))
    # The talk renders through the whole outage and past it: the job keeps polling D-ID, alive,
    # with nothing to write to the store (a write would end the run when the store is away).
    op = talk_rendering_in_did(c, 4 * SHORT_LEASE_S)
    c.stop_postgres()
    try:
        time.sleep(3 * SHORT_LEASE_S)  # the lease lapses (its expiry is on the store's clock)
    finally:
        c.start_postgres()
    wait_until(
        lambda: set(job_health(c).values()) == {health_pb2.HealthCheckResponse.SERVING}, 30, "JobService SERVING again"
    )
    assert_succeeded_once(c, wait_done(c, op.name), talks_before)
