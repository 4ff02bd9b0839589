"""WatchOperation across real replicas (tests/cluster.py: PostgreSQL, one Triton, three replica
processes with their job workers, the D-ID emulator, HAProxy): live watchers on every replica
and through the load balancer, whichever replica runs the job, each get every event once, in
order, as it happens (committed, NOTIFY, read by sequence from the store), and a watcher that
resumes with after_sequence on a replica not running the job gets the rest."""

from __future__ import annotations

import threading
import time

import httpx
from google.longrunning import operations_pb2, operations_pb2_grpc

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from framewise.v1 import jobs_service_pb2_grpc
from tests.cluster import ClusterHandle, cluster  # noqa: F401 - the fixture
from tests.e2e.test_jobs import talking_request

TIMEOUT_S = 120
DID_DELAY_S = 3.0


class Watcher(threading.Thread):
    """One live WatchOperation stream: (receipt time, event) for each non-heartbeat event."""

    def __init__(self, stub: jobs_service_pb2_grpc.JobServiceStub, name: str, after_sequence: int = 0) -> None:
        super().__init__(daemon=True)
        self.stream = stub.WatchOperation(
            jobs_pb2.WatchOperationRequest(name=name, after_sequence=after_sequence), timeout=TIMEOUT_S
        )
        self.received: list[tuple[float, jobs_pb2.WatchOperationResponse]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.stream:
                if event.WhichOneof("event") != "heartbeat":
                    self.received.append((time.monotonic(), event))
        except BaseException as exc:  # reported by the test
            self.error = exc

    @property
    def events(self) -> list[jobs_pb2.WatchOperationResponse]:
        return [e for _, e in self.received]


def test_watchers_on_every_replica_get_every_event_live_once_in_order(cluster: ClusterHandle) -> None:  # noqa: F811
    # D-ID renders for a while, so the job is mid-stream long enough to watch it live.
    httpx.post(
        f"{cluster.emulator_url}/_emulator/faults",
        json={"talk_outcome": "done", "stage_delay_s": DID_DELAY_S},
        timeout=5,
    ).raise_for_status()
    lb = cluster.channel()
    op = jobs_service_pb2_grpc.JobServiceStub(lb).CreateTalkingVideo(talking_request(skip_matting=True), timeout=30)
    watchers = {
        r.replica_id: Watcher(jobs_service_pb2_grpc.JobServiceStub(cluster.channel(r.address)), op.name)
        for r in cluster.replicas
    }
    watchers["lb"] = Watcher(jobs_service_pb2_grpc.JobServiceStub(lb), op.name)
    for w in watchers.values():
        w.start()

    # Once it runs, a watcher resumes on a replica that is not running it (a client reconnecting).
    operations = operations_pb2_grpc.OperationsStub(lb)
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        meta = jobs_pb2.JobMetadata()
        operations.GetOperation(operations_pb2.GetOperationRequest(name=op.name), timeout=10).metadata.Unpack(meta)
        if meta.replica and meta.stage >= jobs_pb2.JOB_STAGE_DID_UPLOAD:
            break
        assert time.monotonic() < deadline, "the job did not reach D-ID"
        time.sleep(0.05)
    holder = meta.replica
    other = next(r for r in cluster.replicas if r.replica_id != holder)
    resumed_after = 2
    resumed = Watcher(jobs_service_pb2_grpc.JobServiceStub(cluster.channel(other.address)), op.name, resumed_after)
    resumed.start()

    for w in [*watchers.values(), resumed]:
        w.join(TIMEOUT_S)
        assert not w.is_alive(), "a watch stream did not end"
        assert w.error is None, w.error
    reference = watchers[holder].events
    assert reference[-1].WhichOneof("event") == "complete"
    count = len(reference)
    for where, w in watchers.items():
        events = w.events
        assert [e.sequence for e in events] == list(range(1, count + 1)), where
        # The same events (type, payload, time), not merely the same numbers.
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in reference], where
    assert [e.sequence for e in resumed.events] == list(range(resumed_after + 1, count + 1))

    # Live, not replayed at the end: on replicas not running the job, D-ID's processing stage was
    # received at least most of D-ID's delay before the terminal event.
    for where, w in watchers.items():
        if where == holder:
            continue
        times = {e.sequence: t for t, e in w.received}
        processing = next(
            e.sequence for _, e in w.received if e.stage_update.stage == jobs_pb2.JOB_STAGE_DID_PROCESSING
        )
        assert times[count] - times[processing] > DID_DELAY_S / 2, where
