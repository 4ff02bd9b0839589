"""With Triton stopped the service fails fast with UNAVAILABLE and health turns NOT_SERVING;
when Triton is back, it recovers on its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from framewise.v1 import common_pb2, info_service_pb2, info_service_pb2_grpc, vision_service_pb2, vision_service_pb2_grpc
from tests.conftest import Orchestrator, TritonProcess, health_status, wait_until

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
