"""Attacks on client-certificate authentication (mutual TLS with a tenant map), against a real
orchestrator of its own (real Triton): the TLS port requires a certificate signed by the
test client CA, ``--mtls-tenant-map`` maps certificate identities to tenants, authentication is
required, and an API key made by the admin CLI exists too.

Certificates are made at run time (tests/tls_certs.py's builders); none is committed.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.longrunning import operations_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from framewise.v1 import common_pb2, info_service_pb2, info_service_pb2_grpc, tracking_service_pb2_grpc
from framewise.v1 import tracking_service_pb2 as track_pb2
from tests.conftest import ASSETS, Orchestrator, TritonProcess, start_orchestrator, stop_process, wait_until
from tests.e2e.attacks.secure_server import SERVER_NAME, bearer, create_keys, refusal
from tests.tls_certs import CertPair, _ca, _leaf, _write_cert, _write_key

ACME_URI = "spiffe://framewise.test/tenant/acme"
GLOBEX_DNS = "globex-batch.example"
READER_CN = "acme-reader"


@dataclass
class Certs:
    ca: Path
    server: CertPair
    acme: CertPair  # URI SAN ACME_URI -> tenant acme, every scope but admin
    globex: CertPair  # DNS SAN GLOBEX_DNS -> tenant globex
    reader: CertPair  # CN READER_CN -> tenant acme, vision only
    unmapped: CertPair  # trusted, in no map entry
    lookalike: CertPair  # trusted, no URI SAN, its CN spells ACME_URI
    stranger: CertPair  # signed by another CA


@dataclass
class MtlsServer:
    orchestrator: Orchestrator
    certs: Certs
    globex_key: str


def _make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca, other = _ca("framewise e2e client CA"), _ca("someone else's CA")

    def leaf(name: str, cn: str, sans: list[x509.GeneralName], issuer=ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH) -> CertPair:  # noqa: ANN001
        cert, key = _leaf(cn, sans, issuer, usage)
        return CertPair(_write_cert(cert, folder / f"{name}.pem"), _write_key(key, folder / f"{name}.key"))

    return Certs(
        ca=_write_cert(ca[0], folder / "ca.pem"),
        server=leaf("server", "localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                    usage=ExtendedKeyUsageOID.SERVER_AUTH),
        acme=leaf("acme", "acme-render", [x509.UniformResourceIdentifier(ACME_URI)]),
        globex=leaf("globex", "globex-batch", [x509.DNSName(GLOBEX_DNS)]),
        reader=leaf("reader", READER_CN, [x509.DNSName("reader.acme.example")]),
        unmapped=leaf("unmapped", "nobody", [x509.DNSName("nobody.example")]),
        lookalike=leaf("lookalike", ACME_URI, [x509.DNSName("mallory.example")]),
        stranger=leaf("stranger", "acme-render", [x509.UniformResourceIdentifier(ACME_URI)], issuer=other),
    )  # fmt: skip


def _channel(server: MtlsServer, pair: CertPair | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=server.certs.ca.read_bytes(),
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )
    return grpc.secure_channel(server.orchestrator.address, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)])


def _info(channel: grpc.Channel, metadata: list[tuple[str, str]] | None = None) -> info_service_pb2.GetServerInfoResponse:
    return info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(info_service_pb2.GetServerInfoRequest(), metadata=metadata or [], timeout=10)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[MtlsServer]:
    tmp = tmp_path_factory.mktemp("mtls-attacks")
    certs = _make_certs(tmp / "pki")
    tenant_map = tmp / "tenant-map.json"
    tenant_map.write_text(json.dumps({
        ACME_URI: "acme",
        GLOBEX_DNS: "globex",
        READER_CN: {"tenant": "acme", "scopes": ["vision"]},
    }))  # fmt: skip
    store = tmp / "jobs.sqlite3"
    globex_key = create_keys(store, {"globex": ["--tenant", "globex"]})["globex"]["key"]
    orch = start_orchestrator(
        tmp,
        ["--triton-url", triton.url, "--job-store", str(store), "--auth", "required",
         "--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key), "--tls-client-ca", str(certs.ca),
         "--mtls-tenant-map", str(tenant_map), "--auth-key-cache-ttl", "0.3"],
        name="mtls-attacks",
    )  # fmt: skip
    server = MtlsServer(orch, certs, globex_key)
    probe = _channel(server, certs.acme)
    try:
        wait_until(
            lambda: orch.process.poll() is None and _health(probe) == health_pb2.HealthCheckResponse.SERVING, 120, "the mTLS server to serve"
        )
    except AssertionError:
        stop_process(orch.process)
        raise AssertionError(f"mTLS server never served; log:\n{orch.log_text()[-4000:]}") from None
    finally:
        probe.close()
    yield server
    stop_process(orch.process)


def _health(channel: grpc.Channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
    except grpc.RpcError:
        return None


def _serves(server: MtlsServer) -> None:
    """The next valid call is answered: a mapped certificate's GetServerInfo."""
    assert server.orchestrator.process.poll() is None, server.orchestrator.log_text()[-3000:]
    with _channel(server, server.certs.acme) as channel:
        assert _info(channel).models


@pytest.mark.parametrize("who", ["none", "stranger"])
def test_a_client_without_a_trusted_certificate_never_completes_the_handshake(mtls: MtlsServer, who: str) -> None:
    with _channel(mtls, None if who == "none" else mtls.certs.stranger) as channel:
        error = refusal(lambda: _info(channel, bearer(mtls.globex_key)))  # a valid key does not help
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    _serves(mtls)


def test_a_trusted_certificate_the_map_does_not_know_authenticates_nobody(mtls: MtlsServer) -> None:
    with _channel(mtls, mtls.certs.unmapped) as channel:
        error = refusal(lambda: _info(channel))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    _serves(mtls)


def test_a_common_name_spelling_another_clients_uri_is_not_that_client(mtls: MtlsServer) -> None:
    """The map's key ACME_URI names a URI SAN. A certificate without that SAN whose common name
    is the same string (a CA that lets requesters choose their CN would sign it) must not
    become acme."""
    with _channel(mtls, mtls.certs.lookalike) as channel:
        error = refusal(lambda: _info(channel))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    _serves(mtls)


def test_a_mapped_certificate_gets_its_scopes_only(mtls: MtlsServer) -> None:
    with _channel(mtls, mtls.certs.reader) as channel:
        _info(channel)  # authenticated
        request = operations_pb2.ListOperationsRequest()
        error = refusal(lambda: channel.unary_unary(
            "/google.longrunning.Operations/ListOperations",
            operations_pb2.ListOperationsRequest.SerializeToString, operations_pb2.ListOperationsResponse.FromString,
        )(request, timeout=10))  # fmt: skip
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (error.code(), error.details())
    assert "'jobs:read'" in (error.details() or "")
    _serves(mtls)


def _kept_session(channel: grpc.Channel) -> str:
    folder = ASSETS / "sequences" / "Crossing"
    x, y, w, h = (float(v) for v in re.split(r"[\t,]", (folder / "groundtruth_rect.txt").read_text().split("\n")[0].strip()))
    frame = track_pb2.TrackFrame(frame_index=0, image=common_pb2.Image(encoded=(folder / "img" / "0001.jpg").read_bytes()))
    frame.prompts.add(object_id=1, box=common_pb2.BoundingBox(x1=x, y1=y, x2=x + w, y2=y + h))
    requests = [track_pb2.TrackRequest(open=track_pb2.OpenSession(keep_on_close=True)), track_pb2.TrackRequest(frame=frame)]
    replies = list(tracking_service_pb2_grpc.TrackingServiceStub(channel).Track(iter(requests), timeout=120))
    return replies[0].session.session_id


def _resume(channel: grpc.Channel, session_id: str, metadata: list[tuple[str, str]] | None = None) -> track_pb2.SessionOpened:
    request = track_pb2.TrackRequest(open=track_pb2.OpenSession(resume_session_id=session_id, keep_on_close=True))
    return list(tracking_service_pb2_grpc.TrackingServiceStub(channel).Track(iter([request]), metadata=metadata or [], timeout=30))[0].session


def test_another_tenants_certificate_cannot_resume_a_session(mtls: MtlsServer) -> None:
    with _channel(mtls, mtls.certs.acme) as acme:
        session = _kept_session(acme)
        with _channel(mtls, mtls.certs.globex) as globex:
            theirs = refusal(lambda: _resume(globex, session))
            nobody = refusal(lambda: _resume(globex, uuid.uuid4().hex))
        assert theirs.code() == nobody.code() == grpc.StatusCode.NOT_FOUND, (theirs.details(), nobody.details())
        assert _resume(acme, session).resumed  # acme's own certificate resumes it
    _serves(mtls)


def test_a_bearer_token_decides_over_the_certificate(mtls: MtlsServer) -> None:
    """acme's certificate with globex's API key acts as globex (it cannot resume acme's
    session); with a refused token it is refused, not let in on the certificate."""
    with _channel(mtls, mtls.certs.acme) as acme:
        session = _kept_session(acme)
        as_globex = refusal(lambda: _resume(acme, session, bearer(mtls.globex_key)))
        assert as_globex.code() == grpc.StatusCode.NOT_FOUND, (as_globex.code(), as_globex.details())
        forged = refusal(lambda: _info(acme, bearer(mtls.globex_key[:-2] + "zz")))
        assert forged.code() == grpc.StatusCode.UNAUTHENTICATED, (forged.code(), forged.details())
    _serves(mtls)
