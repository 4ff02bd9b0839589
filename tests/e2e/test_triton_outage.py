"""With Triton stopped the service fails fast with UNAVAILABLE and health turns NOT_SERVING;
when Triton is back, it recovers on its own."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from framewise.v1 import (
    common_pb2,
    info_service_pb2,
    info_service_pb2_grpc,
    tracking_service_pb2,
    tracking_service_pb2_grpc,
    vision_service_pb2,
    vision_service_pb2_grpc,
)
from tests.conftest import (
    SHARED_MEMORY_ARGS,
    Orchestrator,
    TritonProcess,
    health_status,
    start_orchestrator,
    stop_process,
    wait_until,
)
from tests.e2e.test_tracking import crossing, frame_request, open_request, summary, track

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_triton_outage_and_recovery(
    channel: grpc.Channel, orchestrator: Orchestrator, triton: TritonProcess, assets: Path
) -> None:
    vision = vision_service_pb2_grpc.VisionServiceStub(channel)
    info = info_service_pb2_grpc.InfoServiceStub(channel)
    request = vision_service_pb2.DetectRequest(image=common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes()))
    assert health_status(channel) == SERVING
    assert health_status(channel, "framewise.v1.VisionService") == SERVING
    assert len(vision.Detect(request, timeout=60).detections) == 4

    triton.stop()
    try:
        # A 20 s deadline: failing with UNAVAILABLE (not DEADLINE_EXCEEDED) shows the call did
        # not wait for Triton.
        with pytest.raises(grpc.RpcError) as failure:
            vision.Detect(request, timeout=20)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Triton" in failure.value.details()

        wait_until(lambda: health_status(channel) == NOT_SERVING, 10, "health to report NOT_SERVING")
        assert health_status(channel, "framewise.v1.VisionService") == NOT_SERVING
        state = info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=5)
        assert not state.serving and not state.triton.ready and state.triton.last_error
        cli = subprocess.run(
            [str(Path(sys.executable).parent / "framewise"), "--server", orchestrator.address, "info"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 1 and "NOT_SERVING" in cli.stdout
    finally:
        triton.start()

    wait_until(lambda: health_status(channel) == SERVING, 30, "health to report SERVING again")
    assert len(vision.Detect(request, timeout=60).detections) == 4
    state = info.GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=5)
    assert state.serving and state.triton.ready and state.triton.last_error == ""
    # The restarted Triton had forgotten the orchestrator's shared-memory region; it was
    # registered again instead of failing requests.
    assert orchestrator.log_text().count('"msg": "shared memory registered with Triton"') >= 2


def test_a_track_stream_cut_by_a_triton_outage_resumes_where_it_stopped(
    triton: TritonProcess, assets: Path, tmp_path: Path
) -> None:
    """Triton goes away in the middle of a frame: the stream ends UNAVAILABLE ("retry shortly"),
    the half-done frame is undone, and the session is kept, so resuming it once Triton is back
    and sending the frame again gives exactly what an uninterrupted session gives."""
    frames, boxes = crossing(assets)
    frames = frames[:8]
    first = lambda i: boxes[0] if i == 0 else None  # noqa: E731
    # A monitor that never polls again: the orchestrator does not notice the outage before the
    # frame reaches Triton, so the failure happens half-way through the frame, as in a crash.
    orch = start_orchestrator(tmp_path, ["--triton-url", triton.url, *SHARED_MEMORY_ARGS, "--health-interval", "3600"])
    try:
        with grpc.insecure_channel(orch.address) as channel:
            wait_until(lambda: health_status(channel) == SERVING, 60, "the orchestrator to serve")
            stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
            _, reference = track(stub, [open_request()] + [frame_request(f, box=first(i)) for i, f in enumerate(frames)])

            requests: queue.Queue = queue.Queue()
            for i, data in enumerate(frames[:4]):
                requests.put(frame_request(data, box=first(i)))

            def fed() -> Iterator[tracking_service_pb2.TrackRequest]:
                yield open_request()
                yield from iter(requests.get, None)

            responses = stub.Track(fed(), timeout=300)
            session_id = next(responses).session.session_id
            results = [next(responses).frame for _ in range(4)]
            triton.stop()
            try:
                requests.put(frame_request(frames[4]))
                with pytest.raises(grpc.RpcError) as failure:
                    next(responses)
                assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "retry" in failure.value.details()
            finally:
                requests.put(None)
                triton.start()

            # What a client told to retry does: resume and go on from where the session says.
            deadline = time.monotonic() + 60
            while len(results) < len(frames):
                try:
                    rest = [open_request(resume=session_id)] + [frame_request(f) for f in frames[len(results) :]]
                    for response in stub.Track(iter(rest), timeout=300):
                        if response.HasField("session"):
                            assert response.session.resumed and response.session.next_frame_index == len(results)
                        else:
                            results.append(response.frame)
                except grpc.RpcError as error:  # the Triton channel may still be reconnecting
                    assert error.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, error.details()
                    time.sleep(0.5)
    finally:
        stop_process(orch.process)
    assert summary(results) == summary(reference)
