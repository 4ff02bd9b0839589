"""Tracking sessions across replicas: real orchestrator processes on one PostgreSQL job store and
the same Triton. A replica drained with SIGTERM mid-session hands the session to the store;
resumed on another replica, it tracks on with masks byte-identical to an uninterrupted run. A
resume on a replica that never held the session is NOT_FOUND and says where to go. The SDK and
`framewise track` reconnect and resume by themselves.

The SAM 2 parts are the CPU repository's stand-ins: the masks carry no learned meaning, but they
are computed by the real graphs from the real state, so a state that differs in any bit shows."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from framewise.v1 import tracking_service_pb2 as pb, tracking_service_pb2_grpc
from tests.conftest import Orchestrator, TritonProcess, bad_request_fields, serving_orchestrator, stop_process
from tests.e2e.test_tracking import crossing, frame_request

FRAMES = 40  # past SAMURAI's 15 warm-up frames: the Kalman filter is in its stable phase
CUT = 22  # frames tracked before the drain
FRAMEWISE = str(Path(sys.executable).parent / "framewise")
SESSION_HEADER = "x-framewise-session"


@pytest.fixture(scope="module")
def store_url(postgres_server) -> str:  # noqa: ANN001 - LocalPostgres
    """A fresh schema in the session's PostgreSQL: the replicas' shared job store."""
    import psycopg

    schema = f"handoff_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{postgres_server.url}?options=-csearch_path%3D{schema}"


class Replicas:
    """Orchestrator replicas started on demand, all on the module's store and storage root."""

    def __init__(self, tmp: Path, triton: TritonProcess, store_url: str) -> None:
        self.tmp, self.triton, self.store_url = tmp, triton, store_url
        self.started: list[Orchestrator] = []

    def start(self, name: str) -> Orchestrator:
        orch = serving_orchestrator(
            self.tmp,
            ["--triton-url", self.triton.url, "--job-store", self.store_url, "--storage-root", str(self.tmp / "storage"),
             "--replica-id", name, "--session-idle-ttl", "120"],
            name=name,
        )  # fmt: skip
        self.started.append(orch)
        return orch


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, store_url: str) -> Iterator[Replicas]:
    handle = Replicas(tmp_path_factory.mktemp("handoff"), triton, store_url)
    yield handle
    for orch in handle.started:
        stop_process(orch.process)


@pytest.fixture(scope="module")
def steady(replicas: Replicas) -> Orchestrator:
    """The replica that stays up for the whole module."""
    return replicas.start("replica-steady")


@pytest.fixture(scope="module")
def sequence(assets: Path):  # noqa: ANN201
    frames, boxes = crossing(assets)
    return frames[:FRAMES], boxes


def stub(orch: Orchestrator) -> tracking_service_pb2_grpc.TrackingServiceStub:
    channel = grpc.insecure_channel(orch.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    return tracking_service_pb2_grpc.TrackingServiceStub(channel)


def keyed(key: str) -> tuple[tuple[str, str], ...]:
    return ((SESSION_HEADER, key),)


def opening(key: str = "", resume: str = "", keep: bool = False) -> pb.TrackRequest:
    return pb.TrackRequest(open=pb.OpenSession(session_key=key, resume_session_id=resume, keep_on_close=keep))


def frames_from(frames: list[bytes], boxes, start: int) -> list[pb.TrackRequest]:  # noqa: ANN001
    return [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames) if i >= start]


def outcome(results: list[pb.FrameResult]) -> list[tuple]:
    """Everything a frame answers but its timings: the masks as their RLE bytes."""
    return [
        (r.frame_index, o.object_id, o.mask.counts, o.mask.height, o.mask.width, o.predicted_iou, o.present,
         o.object_score, o.kalman_selected, o.candidate_index, o.box.x1, o.box.y1, o.box.x2, o.box.y2)
        for r in results
        for o in r.objects
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(steady: Orchestrator, sequence) -> list[pb.FrameResult]:  # noqa: ANN001
    frames, boxes = sequence
    key = f"baseline-{uuid.uuid4()}"
    responses = list(stub(steady).Track(iter([opening(key), *frames_from(frames, boxes, 0)]), metadata=keyed(key), timeout=300))
    assert responses[0].session.session_id == key and not responses[0].session.resumed
    results = [r.frame for r in responses[1:]]
    assert [r.frame_index for r in results] == list(range(FRAMES))
    return results


def test_a_resume_on_a_replica_that_never_held_the_session_is_not_found(replicas: Replicas, steady: Orchestrator, sequence) -> None:  # noqa: ANN001
    frames, boxes = sequence
    other = replicas.start("replica-other")
    key = f"held-elsewhere-{uuid.uuid4()}"
    opened = list(stub(steady).Track(iter([opening(key, keep=True), *frames_from(frames[:3], boxes, 0)]), metadata=keyed(key), timeout=120))
    assert opened[0].session.session_id == key and len(opened) == 4

    with pytest.raises(grpc.RpcError) as wrong:
        list(stub(other).Track(iter([opening(resume=key)]), metadata=keyed(key), timeout=60))
    assert wrong.value.code() == grpc.StatusCode.NOT_FOUND
    details = wrong.value.details()
    assert f"tracking session '{key}' is not held by replica 'replica-other'" in details
    assert f"reconnect with metadata x-framewise-session: '{key}'" in details

    # The replica holding it resumes it (it was not handed anywhere by the refusal).
    again = list(stub(steady).Track(iter([opening(resume=key), *frames_from(frames[:4], boxes, 3)]), metadata=keyed(key), timeout=120))
    assert again[0].session.resumed and again[0].session.next_frame_index == 3 and again[1].frame.frame_index == 3

    # A key the server cannot route or echo safely, or two keys that disagree: INVALID_ARGUMENT.
    for request, metadata in (
        (opening("k" * 129), ()),
        (opening("has space"), ()),
        (opening("field-key"), keyed("header-key")),
        (opening(resume="resume-key"), keyed("other-key")),
    ):
        with pytest.raises(grpc.RpcError) as bad:
            list(stub(steady).Track(iter([request]), metadata=metadata, timeout=60))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad.value.details()
        assert bad_request_fields(bad.value) in (["open.session_key"], ["open.resume_session_id"])
        assert len(bad.value.details()) < 600


def test_a_session_drained_mid_video_resumes_on_another_replica_with_identical_masks(
    replicas: Replicas, steady: Orchestrator, sequence, uninterrupted: list[pb.FrameResult]  # noqa: ANN001
) -> None:
    frames, boxes = sequence
    draining = replicas.start("replica-draining")
    key = f"drained-{uuid.uuid4()}"
    release = threading.Event()

    def first_part() -> Iterator[pb.TrackRequest]:
        yield opening(key)
        yield from frames_from(frames[:CUT], boxes, 0)
        release.wait(120)  # the stream stays open, waiting for the next frame, as a live client's does

    results_before: list[pb.FrameResult] = []
    call = stub(draining).Track(first_part(), metadata=keyed(key), timeout=300)
    with pytest.raises(grpc.RpcError) as ended:
        for response in call:
            if response.WhichOneof("message") == "frame":
                results_before.append(response.frame)
                if len(results_before) == CUT:
                    draining.process.send_signal(signal.SIGTERM)
    release.set()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"tracking session '{key}' was handed off at frame {CUT}" in ended.value.details()
    assert draining.process.wait(60) == 0
    assert any(r.get("msg") == "tracking session handed off" and r.get("session") == key for r in draining.log_records())

    responses = list(stub(steady).Track(iter([opening(resume=key), *frames_from(frames, boxes, CUT)]), metadata=keyed(key), timeout=300))
    resumed = responses[0].session
    assert resumed.resumed and resumed.session_id == key
    assert resumed.next_frame_index == CUT and list(resumed.object_ids) == [1]
    results_after = [r.frame for r in responses[1:]]
    assert outcome(results_before + results_after) == outcome(uninterrupted)

    # The state was taken, not copied: once this stream released the session, nothing is left.
    with pytest.raises(grpc.RpcError) as gone:
        list(stub(steady).Track(iter([opening(resume=key)]), metadata=keyed(key), timeout=60))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_framewise_track_survives_a_replica_drain_mid_video(
    replicas: Replicas, steady: Orchestrator, assets: Path, uninterrupted: list[pb.FrameResult], tmp_path: Path
) -> None:
    # Two replicas behind one client channel (gRPC's pick_first over an address list: the first
    # while it is up, then the next), standing in for the load balancer that
    # tests/e2e/test_cluster_sessions.py puts in front.
    draining = replicas.start("replica-cli-drained")
    target = f"ipv4:{draining.address},{steady.address}"
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, path in enumerate(sorted((assets / "sequences" / "Crossing" / "img").glob("*.jpg"))[:FRAMES]):
        (folder / f"{i:04d}.jpg").write_bytes(path.read_bytes())
    x1, y1, x2, y2 = crossing(assets)[1][0]
    cli = subprocess.Popen(
        [FRAMEWISE, "--server", target, "track", str(folder), "--box", f"{x1},{y1},{x2 - x1},{y2 - y1}", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines = []
    try:
        assert cli.stdout is not None
        for line in cli.stdout:
            lines.append(json.loads(line))
            if len(lines) == 12:
                draining.process.send_signal(signal.SIGTERM)
        assert cli.wait(120) == 0, cli.stderr.read() if cli.stderr else ""
    finally:
        if cli.poll() is None:
            cli.kill()
    assert draining.process.wait(60) == 0
    stderr = cli.stderr.read() if cli.stderr else ""
    assert "resuming the session" in stderr and "handed off at frame" in stderr
    assert any(r.get("msg") == "tracking session handed off" for r in draining.log_records())
    assert any(r.get("msg") == "tracking session restored from its handoff" for r in steady.log_records())
    expected = [
        {"frame": r.frame_index, "objects": [
            {"id": o.object_id, "box": [round(v, 1) for v in (o.box.x1, o.box.y1, o.box.x2, o.box.y2)],
             "score": round(o.predicted_iou, 4), "present": o.present} for o in r.objects]}
        for r in uninterrupted
    ]  # fmt: skip
    assert lines == expected
