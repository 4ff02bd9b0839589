"""Fixtures for tests that need TLS: the run's PKI (tests/tls_certs.py) and an orchestrator
whose gRPC port requires client certificates. Import them into a test module by name:

    from tests.tls_fixtures import mtls_orchestrator, pki  # noqa: F401 - pytest fixtures
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.channel import Connection, open_channel
from tests.conftest import Orchestrator, TritonProcess, start_orchestrator, stop_process, wait_until
from tests.tls_certs import Pki, make_pki


def serving(address: str, connection: Connection) -> bool:
    """Overall health is SERVING, asked over ``connection``."""

    async def check() -> bool:
        async with open_channel(address, connection) as channel:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return response.status == health_pb2.HealthCheckResponse.SERVING

    return asyncio.run(check())


def tls_address(orch: Orchestrator) -> str:
    """The orchestrator's address by the name its test certificate carries."""
    return orch.address.replace("127.0.0.1", "localhost")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_orchestrator(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, pki: Pki) -> Iterator[Orchestrator]:
    """The real orchestrator on loopback with TLS, requiring client certificates signed by pki.ca."""
    orch = start_orchestrator(
        tmp_path_factory.mktemp("mtls"),
        ["--triton-url", triton.url, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
         "--tls-client-ca", str(pki.ca)],
        name="mtls",
    )  # fmt: skip
    good = Connection(ca_cert=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key)
    try:
        wait_until(lambda: orch.process.poll() is None and serving(tls_address(orch), good), 60, "the mTLS orchestrator to serve")
    except AssertionError:
        stop_process(orch.process)
        raise AssertionError(f"mTLS orchestrator never served; log:\n{orch.log_text()[-4000:]}") from None
    yield orch
    stop_process(orch.process)
