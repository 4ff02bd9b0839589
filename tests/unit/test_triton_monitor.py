"""The model monitor's health reporting (server/triton/monitor.py) before it has asked Triton
anything: grpc's HealthServicer starts with the server SERVING, and a starting replica must not
look ready to a probe or a load balancer."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.triton.client import TritonClient
from server.triton.monitor import TritonMonitor


async def test_before_the_first_refresh_everything_is_not_serving() -> None:
    health = health_aio.HealthServicer()
    # Nothing listens there: publish() must not need Triton.
    client = TritonClient("127.0.0.1:9", default_timeout_s=1.0)
    monitor = TritonMonitor(client, {"framewise.v1.VisionService": ("yolov8",)}, health, Metrics(CollectorRegistry()))
    check = health_pb2.HealthCheckRequest
    assert (await health.Check(check(service=""), None)).status == health_pb2.HealthCheckResponse.SERVING  # grpc's default
    await monitor.publish()
    for service in ("", "framewise.v1.VisionService"):
        assert (await health.Check(check(service=service), None)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert monitor.statuses == {"": False, "framewise.v1.VisionService": False}
    await client.close()
