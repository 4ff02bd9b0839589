"""Tracking sessions through the real load balancer (HAProxy hashing x-framewise-session) in front
of two replicas on PostgreSQL (tests/cluster.py): the SDK keeps a session on the replica its key
hashes to, and when that replica drains mid-video, resumes it through the balancer on the other
one with the results of an uninterrupted run."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clients.sdk import FramewiseClient
from framewise.v1 import common_pb2, tracking_service_pb2 as pb
from tests.cluster import ClusterHandle, replica_answering, running_cluster
from tests.e2e.test_tracking import crossing

FRAMES = 40
CUT = 15


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, triton, postgres_server) -> Iterator[ClusterHandle]:  # noqa: ANN001
    with running_cluster(
        tmp_path_factory.mktemp("cluster-sessions"), triton.url, postgres_server.url, replicas=2,
        replica_args=["--session-idle-ttl", "120"],
    ) as handle:  # fmt: skip
        yield handle


def track_frames(assets: Path) -> list[pb.TrackFrame]:
    frames, boxes = crossing(assets)
    x1, y1, x2, y2 = boxes[0]
    out = [pb.TrackFrame(image=common_pb2.Image(encoded=f)) for f in frames[:FRAMES]]
    out[0].prompts.add(object_id=1, box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2))
    return out


def outcome(results: list[pb.FrameResult]) -> list[tuple]:
    return [
        (r.frame_index, o.object_id, o.mask.counts, o.predicted_iou, o.present, o.object_score, o.kalman_selected, o.candidate_index)
        for r in results
        for o in r.objects
    ]


async def test_a_session_survives_the_drain_of_its_replica_behind_the_load_balancer(cluster: ClusterHandle, assets: Path) -> None:
    frames = track_frames(assets)
    async with FramewiseClient(cluster.address, timeout_s=60) as client:
        baseline = [r.frame async for r in client.track(frames, session_key=f"baseline-{uuid.uuid4()}") if r.HasField("frame")]
        assert [r.frame_index for r in baseline] == list(range(FRAMES))

        key = f"drained-{uuid.uuid4()}"
        # The balancer sends every call with this key to one replica: the one that will hold it.
        holder_id = replica_answering(cluster.channel(), key)
        assert {replica_answering(cluster.channel(), key) for _ in range(5)} == {holder_id}
        holder = cluster.replica(holder_id)
        (other,) = [r for r in cluster.replicas if r is not holder]

        # Three frames in flight: at the drain, frames written but not read by the replica are
        # sent again to the one that resumes (framewise track's lockstep is in test_session_handoff).
        reconnects: list[grpc.StatusCode] = []
        results: list[pb.FrameResult] = []
        opened: list[pb.SessionOpened] = []
        async for response in client.track(frames, session_key=key, frames_in_flight=3, on_reconnect=lambda _n, e: reconnects.append(e.code())):
            if response.HasField("session"):
                opened.append(response.session)
                continue
            results.append(response.frame)
            if len(results) == CUT:
                cluster.kill(holder, signal.SIGTERM)
    assert len(opened) == 1 and opened[0].session_id == key
    # The draining replica ends the stream with UNAVAILABLE; HAProxy may pass that on, or reset
    # the client's stream (CANCELLED): either way the SDK resumes.
    assert reconnects and set(reconnects) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert outcome(results) == outcome(baseline)  # every frame once, in order, masks byte-identical
    assert holder.process is not None and holder.process.wait(60) == 0
    assert "tracking session handed off" in holder.log_text()
    assert "tracking session restored from its handoff" in other.log_text()
