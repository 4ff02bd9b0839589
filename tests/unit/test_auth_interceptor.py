"""The authentication interceptor (server/auth/interceptor.py) in a real grpc.aio server on a
real socket, behind the real ObservabilityInterceptor, with a real SQLite job store holding the
keys. The handlers answer with the principal they saw (tenant|subject|via), so each test checks
what the servicer's own task was bound to."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_proto_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection_pb2
from joserfc import jwt
from joserfc.jwk import RSAKey
from prometheus_client import CollectorRegistry

from server.auth import audit
from server.auth.authenticator import Authenticator
from server.auth.backoff import FailureBackoff, peer_address
from server.auth.config import AuthConfig
from server.auth.interceptor import AuthInterceptor
from server.auth.jwt_bearer import JwtVerifier
from server.auth.key_verifier import ApiKeyVerifier
from server.auth.keys import generate_key
from server.auth.layer import build_auth
from server.auth.mtls import load_tenant_map
from server.auth.principal import current_principal
from server.auth.scopes import METHOD_SCOPES, UNLISTED_SCOPE, required_scope
from server.interceptors import ObservabilityInterceptor
from server.jobs.store.sqlite import SqliteJobStore
from server.metrics import Metrics
from server.services import OPERATIONS_SERVICE, SERVICES
from tests.tls_certs import make_pki

DETECT = "/framewise.v1.VisionService/Detect"
SEGMENT = "/framewise.v1.VisionService/Segment"
TRACK = "/framewise.v1.TrackingService/Track"
UPLOAD = "/framewise.v1.JobService/UploadFile"
WATCH = "/framewise.v1.JobService/WatchOperation"
INFO = "/framewise.v1.InfoService/GetServerInfo"
ISSUER, AUDIENCE = "https://issuer.framewise.test", "framewise-api"


# -- the scope table ----------------------------------------------------------------------------


def test_every_method_of_every_service_has_a_scope() -> None:
    services = [*SERVICES.values(), operations_proto_pb2.DESCRIPTOR.services_by_name["Operations"],
                health_pb2.DESCRIPTOR.services_by_name["Health"], reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]]
    assert OPERATIONS_SERVICE in {s.full_name for s in services}
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    missing = sorted(methods - set(METHOD_SCOPES))
    assert not missing, f"methods without a scope in server/auth/scopes.py: {missing}"
    # The families the issue names, each used.
    assert {s for s in METHOD_SCOPES.values() if s} == {"vision", "tracking", "jobs:read", "jobs:write"}


def test_an_unlisted_method_needs_admin() -> None:
    assert required_scope("/framewise.v1.VisionService/SomethingNew") == UNLISTED_SCOPE == "admin"


def test_peer_address_drops_the_port() -> None:
    assert peer_address("ipv4:10.0.0.5:41234") == "ipv4:10.0.0.5"
    assert peer_address("ipv6:[::1]:5000") == "ipv6:[::1]"
    assert peer_address("unix:/tmp/sock") == "unix:/tmp/sock"


def test_backoff_grows_is_bounded_and_forgets() -> None:
    now = [0.0]
    b = FailureBackoff(base_s=0.1, max_s=1.0, window_s=60, clock=lambda: now[0])
    delays = [b.failed("ipv4:1.2.3.4:1000") for _ in range(6)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.failed("ipv4:5.6.7.8:1") == 0.1  # another peer is not slowed by the first
    now[0] = 61.0
    assert b.failed("ipv4:1.2.3.4:2000") == 0.1  # forgotten after the window


def test_backoff_remembers_a_bounded_number_of_peers() -> None:
    b = FailureBackoff(max_peers=100)
    for i in range(1000):
        b.failed(f"ipv4:10.0.{i // 256}.{i % 256}:1")
    assert len(b._failures) == 100


# -- a real server ------------------------------------------------------------------------------


def _answer() -> bytes:
    p = current_principal()
    return f"{p.tenant}|{p.subject}|{p.via}".encode()


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"cross":
        audit.cross_tenant(resource="operations/0123")
    return _answer()


async def _client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    async for _ in requests:
        pass
    return _answer()


async def _server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        await asyncio.sleep(0)
        yield _answer()


async def _bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield _answer()


def _handlers() -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler("framewise.v1.VisionService", {
            "Detect": grpc.unary_unary_rpc_method_handler(_unary),
            "Segment": grpc.unary_unary_rpc_method_handler(_unary),
        }),
        grpc.method_handlers_generic_handler("framewise.v1.TrackingService", {"Track": grpc.stream_stream_rpc_method_handler(_bidi)}),
        grpc.method_handlers_generic_handler("framewise.v1.JobService", {
            "UploadFile": grpc.stream_unary_rpc_method_handler(_client_stream),
            "WatchOperation": grpc.unary_stream_rpc_method_handler(_server_stream),
        }),
        grpc.method_handlers_generic_handler("framewise.v1.InfoService", {"GetServerInfo": grpc.unary_unary_rpc_method_handler(_unary)}),
    ]


@dataclass
class Served:
    address: str
    store: SqliteJobStore
    interceptor: AuthInterceptor
    metrics: Metrics
    server: grpc.aio.Server
    keys: ApiKeyVerifier

    def counter(self, outcome: str, via: str) -> float:
        return self.metrics.registry.get_sample_value("framewise_auth_total", {"outcome": outcome, "via": via}) or 0.0

    async def key(self, *, tenant: str = "acme", scopes: tuple[str, ...] = ("vision", "tracking", "jobs:read", "jobs:write"),
                  expire_time: datetime | None = None) -> str:
        k = generate_key()
        await self.store.create_api_key(key_id=k.key_id, tenant=tenant, scopes=scopes, secret_hash=k.secret_hash,
                                        expire_time=expire_time)
        return k.key


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
    async with SqliteJobStore(tmp_path / "jobs.db") as s:
        yield s


async def _serve(
    store: SqliteJobStore,
    *,
    mode: str = "required",
    jwt_verifier: JwtVerifier | None = None,
    tenant_map: Any = None,
    open_methods: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection."),
    backoff: FailureBackoff | None = None,
    credentials: grpc.ServerCredentials | None = None,
    cache_ttl_s: float = 0.0,
    has_api_keys: Any = None,
    recheck_s: float = 0.0,
) -> Served:
    metrics = Metrics(CollectorRegistry())
    keys = ApiKeyVerifier(store, cache_ttl_s=cache_ttl_s)
    interceptor = AuthInterceptor(
        Authenticator(keys=keys, jwt=jwt_verifier, tenant_map=tenant_map),
        metrics,
        mode=mode,
        open_methods=open_methods,
        backoff=backoff or FailureBackoff(base_s=0.0, max_s=0.0),
        has_api_keys=has_api_keys or store.has_api_keys,
        static_required=jwt_verifier is not None or tenant_map is not None,
        recheck_s=recheck_s,
    )
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor(metrics), interceptor])
    server.add_generic_rpc_handlers(_handlers())
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return Served(f"127.0.0.1:{port}", store, interceptor, metrics, server, keys)


@pytest.fixture
async def served(store: SqliteJobStore) -> AsyncIterator[Served]:
    s = await _serve(store)
    yield s
    await s.server.stop(0)
    await s.keys.close()


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _call(address: str, method: str = DETECT, metadata: Any = None, request: bytes = b"x",
                channel_credentials: grpc.ChannelCredentials | None = None) -> str:
    async with (grpc.aio.insecure_channel(address) if channel_credentials is None
                else grpc.aio.secure_channel(address, channel_credentials)) as channel:
        reply = await channel.unary_unary(method)(request, metadata=metadata, timeout=10)
        return reply.decode()


async def _refusal(address: str, method: str = DETECT, metadata: Any = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _call(address, method, metadata)
    return info.value


async def test_no_credential_is_unauthenticated_and_says_what_is_missing(served: Served) -> None:
    error = await _refusal(served.address)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == "this server requires an API key as 'authorization: Bearer <token>'"
    assert served.counter("missing", "none") == 1


async def test_health_is_open_and_can_be_closed(store: SqliteJobStore) -> None:
    open_ = await _serve(store)
    closed = await _serve(store, open_methods=())
    try:
        async with grpc.aio.insecure_channel(open_.address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(closed.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Any valid key opens it (health needs no scope).
            key = await closed.key(scopes=())
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=_bearer(key))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for s in (open_, closed):
            await s.server.stop(0)
            await s.keys.close()


async def test_a_valid_key_runs_every_call_shape_as_its_tenant(served: Served) -> None:
    key = await served.key(tenant="acme")
    key_id = key.split("_")[1]
    expected = f"acme|{key_id}|api_key"
    md = _bearer(key)
    assert await _call(served.address, DETECT, md) == expected
    async with grpc.aio.insecure_channel(served.address) as channel:
        upload = await channel.stream_unary(UPLOAD)(iter([b"a", b"b"]), metadata=md, timeout=10)
        assert upload.decode() == expected
        watched = [m.decode() async for m in channel.unary_stream(WATCH)(b"x", metadata=md, timeout=10)]
        assert watched == [expected, expected]
        track = channel.stream_stream(TRACK)(metadata=md, timeout=10)
        for _ in range(3):
            await track.write(b"frame")
            assert (await track.read()).decode() == expected
        await track.done_writing()
    assert served.counter("ok", "api_key") == 4
    # The scheme is case-insensitive (RFC 7235).
    assert await _call(served.address, DETECT, (("authorization", f"bearer {key}"),)) == expected


async def test_two_tenants_keys_run_as_their_own_tenants_concurrently(served: Served) -> None:
    a, b = await served.key(tenant="tenant-a"), await served.key(tenant="tenant-b")
    answers = await asyncio.gather(*(_call(served.address, DETECT, _bearer(k)) for k in [a, b] * 10))
    assert [x.split("|")[0] for x in answers] == ["tenant-a", "tenant-b"] * 10


@pytest.mark.parametrize("kind", ["unknown", "wrong_secret", "revoked", "expired", "garbage", "basic", "two_headers"])
async def test_a_refused_credential_never_says_why(served: Served, kind: str) -> None:
    key = await served.key()
    expired = await served.key(expire_time=datetime.now(UTC) - timedelta(seconds=1))
    metadata = {
        "unknown": _bearer(generate_key().key),
        "wrong_secret": _bearer(key[:-2] + ("AA" if not key.endswith("AA") else "BB")),
        "revoked": _bearer(key),
        "expired": _bearer(expired),
        "garbage": _bearer("hunter2"),
        "basic": (("authorization", "Basic dXNlcjpwYXNz"),),
        "two_headers": (("authorization", f"Bearer {key}"), ("authorization", "Bearer x")),
    }[kind]
    if kind == "revoked":
        await served.store.revoke_api_key(key.split("_")[1])
    error = await _refusal(served.address, DETECT, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == (
        "the credential presented was not accepted; this server requires an API key as 'authorization: Bearer <token>'"
    )
    # And the server answers the next valid call.
    if kind != "revoked":
        assert (await _call(served.address, DETECT, _bearer(key))).startswith("acme|")


async def test_a_missing_scope_is_permission_denied_naming_it(served: Served) -> None:
    key = await served.key(scopes=("vision",))
    assert (await _call(served.address, DETECT, _bearer(key))).startswith("acme|")
    async with grpc.aio.insecure_channel(served.address) as channel:
        track = channel.stream_stream(TRACK)(metadata=_bearer(key), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await track.read()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'tracking'" in info.value.details()
    async with grpc.aio.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.stream_unary(UPLOAD)(iter([b"a"]), metadata=_bearer(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'jobs:write'" in info.value.details()
    assert served.counter("denied", "api_key") == 2
    # Server info needs a credential but no scope.
    assert (await _call(served.address, INFO, _bearer(key))).startswith("acme|")


async def test_a_revocation_made_elsewhere_holds_within_the_cache_ttl(store: SqliteJobStore, tmp_path: Path) -> None:
    served = await _serve(store, cache_ttl_s=0.5)
    try:
        key = await served.key()
        assert (await _call(served.address, DETECT, _bearer(key))).startswith("acme|")
        async with SqliteJobStore(tmp_path / "jobs.db") as admin:  # the admin CLI's own connection
            await admin.revoke_api_key(key.split("_")[1])
        revoked_at = time.monotonic()
        while True:
            try:
                await _call(served.address, DETECT, _bearer(key))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                break
            assert time.monotonic() - revoked_at < 0.5 + 0.5, "still accepted well past the cache TTL"
            await asyncio.sleep(0.05)
    finally:
        await served.server.stop(0)
        await served.keys.close()


async def test_auto_mode_is_open_until_a_key_exists(store: SqliteJobStore) -> None:
    served = await _serve(store, mode="auto")
    try:
        assert not served.interceptor.required
        flips: list[int] = []
        served.interceptor.on_required = lambda: flips.append(1)
        assert await _call(served.address) == "default|anonymous|anonymous"
        key = await served.key(tenant="acme")
        # recheck_s=0 here: the next call asks the store again (default: every 2 s).
        assert (await _refusal(served.address)).code() == grpc.StatusCode.UNAUTHENTICATED
        assert served.interceptor.required and flips == [1]
        assert (await _call(served.address, DETECT, _bearer(key))).startswith("acme|")
        # Revoking every key does not open the server again.
        await store.revoke_api_key(key.split("_")[1])
        assert (await _refusal(served.address)).code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await served.server.stop(0)
        await served.keys.close()


async def test_off_mode_runs_everything_as_the_default_tenant(store: SqliteJobStore) -> None:
    served = await _serve(store, mode="off")
    try:
        await served.key()
        assert await _call(served.address, DETECT, _bearer("whatever")) == "default|anonymous|anonymous"
        async with grpc.aio.insecure_channel(served.address) as channel:
            track = channel.stream_stream(TRACK)(metadata=_bearer("whatever"), timeout=10)
            await track.write(b"frame")
            assert (await track.read()).decode() == "default|anonymous|anonymous"
            await track.done_writing()
        assert served.counter("ok", "api_key") == served.counter("refused", "none") == 0
    finally:
        await served.server.stop(0)
        await served.keys.close()


async def test_repeated_failures_from_one_peer_are_slowed_not_its_valid_calls(store: SqliteJobStore) -> None:
    served = await _serve(store, backoff=FailureBackoff(base_s=0.05, max_s=0.4))
    try:
        key = await served.key()
        took = []
        for _ in range(5):
            started = time.monotonic()
            await _refusal(served.address, DETECT, _bearer(generate_key().key))
            took.append(time.monotonic() - started)
        # 0.05, 0.1, 0.2, 0.4, 0.4 (bounded) plus the call itself.
        assert took[0] < 0.3 and took[3] >= 0.38 and took[4] >= 0.38 and took[4] < 2.0, took
        started = time.monotonic()
        assert (await _call(served.address, DETECT, _bearer(key))).startswith("acme|")
        assert time.monotonic() - started < 0.3
        # A slowed refusal holds nothing else: a valid call during one answers at once.
        slow = asyncio.create_task(_refusal(served.address, DETECT, _bearer("bad")))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await _call(served.address, DETECT, _bearer(key))
        assert time.monotonic() - started < 0.3
        await slow
    finally:
        await served.server.stop(0)
        await served.keys.close()


async def test_audit_lines_name_the_key_never_the_secret(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    key = await served.key(tenant="acme", scopes=("vision",))
    key_id = key.split("_")[1]
    wrong = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    with caplog.at_level(logging.INFO, logger="server.audit"):
        await _refusal(served.address, DETECT, _bearer(wrong))
        async with grpc.aio.insecure_channel(served.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await channel.stream_unary(UPLOAD)(iter([b"a"]), metadata=_bearer(key), timeout=10)
        await _call(served.address, SEGMENT, _bearer(key), request=b"cross")
    records = [r for r in caplog.records if r.name == "server.audit"]
    events = {r.event: r for r in records}  # type: ignore[attr-defined]
    assert set(events) == {"auth_failure", "permission_denied", "cross_tenant"}
    failure = events["auth_failure"]
    assert (failure.key_id, failure.tenant, failure.method, failure.reason) == (key_id, "acme", DETECT, "wrong_secret")  # type: ignore[attr-defined]
    assert failure.peer.startswith("ipv4:127.0.0.1:")  # type: ignore[attr-defined]
    assert events["permission_denied"].scope == "jobs:write"  # type: ignore[attr-defined]
    cross = events["cross_tenant"]
    assert (cross.method, cross.tenant, cross.key_id, cross.resource) == (SEGMENT, "acme", key_id, "operations/0123")  # type: ignore[attr-defined]
    secret = key.split("_", 2)[2]
    for r in records:
        text = json.dumps(vars(r), default=str)
        assert secret not in text and wrong.split("_", 2)[2] not in text
    assert served.counter("cross_tenant", "api_key") == 1
    assert served.counter("refused", "api_key") == 1


# -- JWTs and client certificates through the server -------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "k1"})


def _jwt_verifier(tmp_path: Path, rsa_key: RSAKey) -> JwtVerifier:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_key.as_dict(private=False)]}))
    return JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=path)


def _token(rsa_key: RSAKey, **overrides: Any) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, "tenant": "globex",
              "scope": "vision"}
    claims.update(overrides)
    return jwt.encode({"alg": "RS256", "kid": "k1"}, claims, rsa_key)


async def test_a_jwt_is_accepted_and_an_expired_one_refused(store: SqliteJobStore, tmp_path: Path, rsa_key: RSAKey) -> None:
    served = await _serve(store, mode="auto", jwt_verifier=_jwt_verifier(tmp_path, rsa_key))
    try:
        assert served.interceptor.required  # an issuer is configured: auto means required
        assert await _call(served.address, DETECT, _bearer(_token(rsa_key))) == "globex|alice|jwt"
        now = int(time.time())
        error = await _refusal(served.address, DETECT, _bearer(_token(rsa_key, iat=now - 900, exp=now - 600)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key or JWT" in error.details() and "expired" not in error.details()
        async with grpc.aio.insecure_channel(served.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.stream_unary(UPLOAD)(iter([b"a"]), metadata=_bearer(_token(rsa_key)), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'jobs:write'" in info.value.details()
        assert served.counter("ok", "jwt") == 1 and served.counter("refused", "jwt") == 1
    finally:
        await served.server.stop(0)
        await served.keys.close()


async def test_a_client_certificate_maps_to_its_tenant(store: SqliteJobStore, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tenant_map_file = tmp_path / "tenants.json"
    tenant_map_file.write_text(json.dumps({"spiffe://framewise.test/tenant/a": {"tenant": "tenant-a", "scopes": ["vision"]}}))
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())], root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    served = await _serve(store, tenant_map=load_tenant_map(tenant_map_file), credentials=credentials)
    try:
        client = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(), private_key=pki.client.key.read_bytes(),
            certificate_chain=pki.client.cert.read_bytes(),
        )
        answer = await _call(served.address, DETECT, None, channel_credentials=client)
        assert answer == "tenant-a|spiffe://framewise.test/tenant/a|mtls"
        # The mapped scopes hold for certificates too.
        async with grpc.aio.secure_channel(served.address, client) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_stream(WATCH)(b"x", timeout=10).read()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'jobs:read'" in info.value.details()
        # A bearer key presented over the same connection decides instead of the certificate.
        key = await served.key(tenant="acme")
        assert (await _call(served.address, DETECT, _bearer(key), channel_credentials=client)).startswith("acme|")
    finally:
        await served.server.stop(0)
        await served.keys.close()


async def test_an_unmapped_certificate_authenticates_nobody(store: SqliteJobStore, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tenant_map_file = tmp_path / "tenants.json"
    tenant_map_file.write_text(json.dumps({"someone-else": "tenant-b"}))
    credentials = grpc.ssl_server_credentials(
        [(pki.server.key.read_bytes(), pki.server.cert.read_bytes())], root_certificates=pki.ca.read_bytes(),
        require_client_auth=True,
    )
    served = await _serve(store, tenant_map=load_tenant_map(tenant_map_file), credentials=credentials)
    try:
        client = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(), private_key=pki.client.key.read_bytes(),
            certificate_chain=pki.client.cert.read_bytes(),
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(served.address, DETECT, None, channel_credentials=client)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "client certificate this server maps to a tenant" in info.value.details()
        assert served.counter("refused", "mtls") == 1
    finally:
        await served.server.stop(0)
        await served.keys.close()


# -- the layer the composition root builds -------------------------------------------------------


@pytest.mark.parametrize(("mode", "with_key", "required"), [
    ("off", True, False), ("auto", False, False), ("auto", True, True), ("required", False, True),
])
async def test_build_auth_decides_whether_credentials_are_required(
    store: SqliteJobStore, mode: str, with_key: bool, required: bool
) -> None:
    if with_key:
        k = generate_key()
        await store.create_api_key(key_id=k.key_id, tenant="acme", scopes=(), secret_hash=k.secret_hash, expire_time=None)
    layer = await build_auth(AuthConfig(mode=mode), store, Metrics(CollectorRegistry()))
    assert layer.auth_required is required
    await layer.close()


async def test_build_auth_refuses_an_unusable_jwks(store: SqliteJobStore, tmp_path: Path) -> None:
    bad = tmp_path / "jwks.json"
    bad.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    config = AuthConfig(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_file=bad)
    with pytest.raises(ValueError, match="symmetric"):
        await build_auth(config, store, Metrics(CollectorRegistry()))


async def test_auto_mode_fails_closed_while_the_store_cannot_say(store: SqliteJobStore, tmp_path: Path) -> None:
    """In auto mode with no key known yet, a store that cannot answer whether one exists (here a
    real store already closed) fails the call, and the next one too: it never runs as anonymous
    on an unknown answer."""
    gone = SqliteJobStore(tmp_path / "gone.db")
    await gone.open()
    await gone.close()
    # A minute between checks: a failed check must not count as one.
    served = await _serve(store, mode="auto", has_api_keys=gone.has_api_keys, recheck_s=60.0)
    try:
        for _ in range(3):
            error = await _refusal(served.address)
            assert error.code() == grpc.StatusCode.INTERNAL
        assert not served.interceptor.required
    finally:
        await served.server.stop(0)
        await served.keys.close()
