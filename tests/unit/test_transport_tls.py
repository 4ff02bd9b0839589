"""TLS and mutual TLS on real sockets: server credentials built by server/transport from
certificates generated here (tests/tls_certs.py), clients built by the SDK's channel helper
(clients/channel.py), and the verified client identity read from gRPC's auth context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from clients.channel import Connection, open_channel
from server.transport import ClientIdentity, TlsSettings, TransportError, add_listen_port, client_identity, client_identity_of
from tests.tls_certs import Pki, make_pki


class _Recording(health_aio.HealthServicer):
    """grpc.health.v1 that also records who each call came from, as the auth layer would see it."""

    def __init__(self) -> None:
        super().__init__()
        self.identities: list[ClientIdentity | None] = []

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        self.identities.append(client_identity_of(context))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _serve(tls: TlsSettings) -> tuple[grpc.aio.Server, int, _Recording]:
    server = grpc.aio.server()
    servicer = _Recording()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_listen_port(server, "127.0.0.1:0", tls)
    await server.start()
    return server, port, servicer


async def _check(port: int, connection: Connection, host: str = "localhost") -> grpc.StatusCode:
    async with open_channel(f"{host}:{port}", connection) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[tuple[int, _Recording]]:
    server, port, servicer = await _serve(TlsSettings(cert=pki.server.cert, key=pki.server.key))
    yield port, servicer
    await server.stop(0)


@pytest.fixture
async def mtls_server(pki: Pki) -> AsyncIterator[tuple[int, _Recording]]:
    tls = TlsSettings(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca, client_auth="require")
    server, port, servicer = await _serve(tls)
    yield port, servicer
    await server.stop(0)


async def test_tls_port_serves_tls_clients_only(tls_server: tuple[int, _Recording], pki: Pki) -> None:
    port, servicer = tls_server
    assert await _check(port, Connection(ca_cert=pki.ca)) == grpc.StatusCode.OK
    # By IP, the certificate's IP SAN matches too.
    assert await _check(port, Connection(ca_cert=pki.ca), host="127.0.0.1") == grpc.StatusCode.OK
    # Plaintext against a TLS port: no connection at all.
    assert await _check(port, Connection()) == grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the server's CA (the system store, or another CA) refuses it.
    assert await _check(port, Connection(tls=True)) == grpc.StatusCode.UNAVAILABLE
    assert await _check(port, Connection(ca_cert=pki.stranger_ca)) == grpc.StatusCode.UNAVAILABLE
    # TLS without client certificates: a call carries no client identity.
    assert servicer.identities == [None, None]


async def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server: tuple[int, _Recording], pki: Pki) -> None:
    port, servicer = mtls_server
    assert await _check(port, Connection(ca_cert=pki.ca)) == grpc.StatusCode.UNAVAILABLE  # no certificate
    stranger = Connection(ca_cert=pki.ca, client_cert=pki.stranger.cert, client_key=pki.stranger.key)
    assert await _check(port, stranger) == grpc.StatusCode.UNAVAILABLE  # signed by a CA the server does not trust
    assert await _check(port, Connection()) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert servicer.identities == []  # none of them reached the servicer
    # The server keeps serving a client with a good certificate.
    good = Connection(ca_cert=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key)
    assert await _check(port, good) == grpc.StatusCode.OK


async def test_verified_client_identity_reaches_the_handler(mtls_server: tuple[int, _Recording], pki: Pki) -> None:
    port, servicer = mtls_server
    good = Connection(ca_cert=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key)
    assert await _check(port, good) == grpc.StatusCode.OK
    (identity,) = servicer.identities
    assert identity is not None
    assert identity.common_name == "tenant-a"
    assert identity.subject == "CN=tenant-a"
    assert set(identity.sans) == {"client-a.example", "spiffe://framewise.test/tenant/a"}
    assert identity.uris == ("spiffe://framewise.test/tenant/a",)
    assert identity.dns_names == ("client-a.example",)
    assert identity.name == "spiffe://framewise.test/tenant/a"  # a URI SAN names a workload first


def test_identity_needs_tls_and_a_certificate() -> None:
    # Plaintext: gRPC's auth context is empty; the same keys over a non-TLS transport are ignored.
    assert client_identity({}) is None
    assert client_identity({"transport_security_type": [b"insecure"], "x509_common_name": [b"forged"]}) is None
    # TLS without a client certificate.
    assert client_identity({"transport_security_type": [b"ssl"], "ssl_session_reused": [b"false"]}) is None
    only_cn = client_identity({"transport_security_type": [b"ssl"], "x509_common_name": [b"acme"], "x509_subject": [b"CN=acme"]})
    assert only_cn is not None and only_cn.name == "acme" and only_cn.sans == ()


async def test_a_key_that_does_not_match_its_certificate_is_refused(pki: Pki) -> None:
    server = grpc.aio.server()
    mismatched = TlsSettings(cert=pki.server.cert, key=pki.client.key)
    with pytest.raises(TransportError, match="is not the private key of --tls-cert"):
        add_listen_port(server, "127.0.0.1:0", mismatched)
    await server.stop(0)


async def test_unreadable_or_non_pem_files_are_named(tmp_path: Path, pki: Pki) -> None:
    server = grpc.aio.server()
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(TransportError, match="--tls-cert"):
        add_listen_port(server, "127.0.0.1:0", TlsSettings(cert=not_pem, key=pki.server.key))
    with pytest.raises(TransportError, match="--tls-key: cannot read"):
        add_listen_port(server, "127.0.0.1:0", TlsSettings(cert=pki.server.cert, key=tmp_path / "gone.key"))
    await server.stop(0)
