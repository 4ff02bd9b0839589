"""TLS in the cluster terminates at HAProxy: the real HAProxy, with a certificate generated here,
in front of a real orchestrator replica listening in plaintext on loopback. gRPC clients reach
the replica through it over TLS only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import grpc
import pytest

from clients.channel import Connection
from clients.sdk import FramewiseClient
from server.cluster.haproxy import Backend, HAProxy, HAProxyConfig, write_frontend_pem
from tests.conftest import Orchestrator, free_port
from tests.tls_certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_frontend_pem_holds_chain_and_key_for_the_owner_only(pki: Pki, tmp_path: Path) -> None:
    pem = write_frontend_pem(pki.server.cert, pki.server.key, tmp_path / "lb" / "frontend.pem")
    text = pem.read_text()
    assert text.startswith("-----BEGIN CERTIFICATE-----") and "PRIVATE KEY-----" in text
    assert pem.stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="--tls-key"):
        write_frontend_pem(pki.server.cert, pki.server.cert, tmp_path / "bad.pem")


def test_tls_bind_line(pki: Pki, tmp_path: Path) -> None:
    backends = (Backend("replica-1", "127.0.0.1", 50061, 9101),)
    assert "    bind 127.0.0.1:50051 proto h2" in HAProxyConfig(backends).render().splitlines()
    tls = HAProxyConfig(backends, tls_pem=tmp_path / "frontend.pem").render().splitlines()
    assert f"    bind 127.0.0.1:50051 ssl crt {tmp_path / 'frontend.pem'} alpn h2" in tls
    # Behind it, the replicas are still spoken to in plaintext h2.
    assert any(line.strip().startswith("server replica-1 127.0.0.1:50061 proto h2") for line in tls)


@pytest.fixture
async def tls_haproxy(orchestrator: Orchestrator, pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    host, _, port = orchestrator.address.rpartition(":")
    metrics_port = urlparse(orchestrator.metrics_url).port
    assert metrics_port is not None
    pem = write_frontend_pem(pki.server.cert, pki.server.key, tmp_path / "frontend.pem")
    config = HAProxyConfig((Backend("replica-1", host, int(port), metrics_port),), listen_port=free_port(), tls_pem=pem, rise=1)
    haproxy = HAProxy(config, tmp_path / "haproxy")
    await haproxy.start()
    try:
        yield f"localhost:{config.listen_port}"
    finally:
        await haproxy.stop()


async def test_clients_reach_a_replica_through_haproxy_over_tls(tls_haproxy: str, pki: Pki, orchestrator: Orchestrator) -> None:
    # The session orchestrator requires a key: the one its fixture made, sent through HAProxy.
    connection = Connection(ca_cert=pki.ca, api_key=orchestrator.api_key)
    async with FramewiseClient(tls_haproxy, connection=connection, timeout_s=10) as client:
        # The health check has to pass once before HAProxy routes to the replica.
        for _ in range(50):
            try:
                info = await client.server_info()
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.1)
        else:
            pytest.fail("HAProxy never routed the call to the replica")
        assert info.replica_id  # answered by the replica behind HAProxy
        # The replica itself is plaintext on loopback: it reports no TLS of its own.
        assert not info.security.tls and info.security.loopback_only
    # Plaintext to the TLS frontend: refused.
    async with FramewiseClient(tls_haproxy, timeout_s=5) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await plain.server_info()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
