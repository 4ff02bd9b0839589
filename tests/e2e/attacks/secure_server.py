"""The pieces of the attack catalogue's server: the real orchestrator over TLS with
authentication required, its API keys made by the admin CLI, a JWT issuer of its own (a JWKS
file with the public key the server trusts, tokens signed at run time), and a generic caller
for every RPC the server offers.

Certificates and signing keys are made at run time (tests/tls_certs.py, joserfc) and live in
the run's temporary folder; none is committed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.longrunning import operations_proto_pb2
from google.protobuf import descriptor, message, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from joserfc import jwt
from joserfc.jwk import RSAKey

from framewise.v1 import info_service_pb2, info_service_pb2_grpc, jobs_service_pb2, tracking_service_pb2, vision_service_pb2
from tests.conftest import ASSETS, Orchestrator, REPO, quota_details
from tests.tls_certs import Pki

# The name the test server certificate carries (tests/tls_certs.py): the channel checks the
# server's certificate against it although the address is an IP.
SERVER_NAME = "localhost"
ISSUER = "https://issuer.framewise.test"
AUDIENCE = "framewise-attack-tests"
KID = "attack-tests-rsa-1"
# Seconds a record of an API key is reused by the server (--auth-key-cache-ttl): how long a
# revocation made by the admin CLI takes to hold. Small so the revocation case stays short.
KEY_CACHE_TTL_S = 0.3
# Seconds between the server's re-reads of per-tenant quota overrides (--quota-refresh).
QUOTA_REFRESH_S = 0.5
CALL_TIMEOUT_S = 60.0


# -- every RPC, from the generated descriptors -----------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    """One method of one service, as its descriptor says."""

    service: str
    name: str
    method: descriptor.MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def request_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[message.Message]:
        return message_factory.GetMessageClass(self.method.output_type)

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def all_rpcs() -> list[Rpc]:
    """Every RPC of every service the orchestrator offers besides health and reflection: the
    framewise.v1 services and google.longrunning.Operations, read from their descriptors (a new
    RPC joins the catalogue without a change here)."""
    files = (
        vision_service_pb2.DESCRIPTOR,
        tracking_service_pb2.DESCRIPTOR,
        jobs_service_pb2.DESCRIPTOR,
        info_service_pb2.DESCRIPTOR,
        operations_proto_pb2.DESCRIPTOR,
    )
    return [
        Rpc(service.full_name, method.name, method)
        for file in files
        for service in file.services_by_name.values()
        for method in service.methods
    ]


def invoke(
    channel: grpc.Channel,
    rpc: Rpc,
    request: message.Message | None = None,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = CALL_TIMEOUT_S,
) -> list[message.Message]:
    """Calls ``rpc`` whatever its kind (a client stream sends ``request`` alone) and returns every
    response message; raises grpc.RpcError."""
    request = request if request is not None else rpc.request_class()
    ser, de = rpc.request_class.SerializeToString, rpc.response_class.FromString
    client_streaming, server_streaming = rpc.method.client_streaming, rpc.method.server_streaming
    md = list(metadata)
    if client_streaming and server_streaming:
        return list(channel.stream_stream(rpc.path, ser, de)(iter([request]), metadata=md, timeout=timeout))
    if client_streaming:
        return [channel.stream_unary(rpc.path, ser, de)(iter([request]), metadata=md, timeout=timeout)]
    if server_streaming:
        return list(channel.unary_stream(rpc.path, ser, de)(request, metadata=md, timeout=timeout))
    return [channel.unary_unary(rpc.path, ser, de)(request, metadata=md, timeout=timeout)]


def refusal(call: Any) -> grpc.RpcError:  # noqa: ANN401 - a zero-argument callable
    """The RpcError ``call()`` raises; AssertionError when it succeeds."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded; it should have been refused")



def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# -- JWTs --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    """The JWT issuer the server trusts (its public key in the JWKS file), and an attacker's key
    of the same shape that the server does not know."""

    def __init__(self, folder: Path) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": KID})
        self.attacker_key = RSAKey.generate_key(2048, parameters={"kid": KID})
        self.jwks_file = folder / "jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [{**self.key.as_dict(private=False), "alg": "RS256", "use": "sig"}]}))

    def claims(self, tenant: str, /, **overrides: Any) -> dict[str, Any]:  # noqa: ANN401
        """Valid claims for ``tenant`` (an hour to live, every scope but admin) with ``overrides``
        applied; an override set to None removes the claim."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": f"user-of-{tenant}",
            "tenant": tenant,
            "scope": "vision tracking jobs:read jobs:write",
            "iat": now,
            "exp": now + 3600,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: Mapping[str, Any], *, key: RSAKey | None = None, kid: str = KID) -> str:
        return jwt.encode({"alg": "RS256", "kid": kid, "typ": "JWT"}, dict(claims), key or self.key)

    def token(self, tenant: str, /, **overrides: Any) -> str:  # noqa: ANN401
        return self.sign(self.claims(tenant, **overrides))

    @staticmethod
    def unsigned(claims: Mapping[str, Any]) -> str:
        """``alg: none``: a token with no signature at all (crafted by hand: no library makes one)."""
        header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        return f"{header}.{_b64(json.dumps(dict(claims)).encode())}."

    def hs256_with_public_key(self, claims: Mapping[str, Any]) -> str:
        """The algorithm-confusion forgery: HS256 whose HMAC secret is the server's own *public*
        RSA key (PEM), which an attacker can read from the JWKS; a verifier that lets the token
        pick its algorithm accepts it."""
        header = _b64(json.dumps({"alg": "HS256", "kid": KID, "typ": "JWT"}).encode())
        body = _b64(json.dumps(dict(claims)).encode())
        secret = self.key.as_pem(private=False)
        signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{_b64(signature)}"

    def tampered(self, tenant: str, new_tenant: str) -> str:
        """A valid token for ``tenant`` whose payload was rewritten to name ``new_tenant``, its
        signature kept."""
        header, _body, signature = self.token(tenant).split(".")
        body = _b64(json.dumps(self.claims(new_tenant)).encode())
        return f"{header}.{body}.{signature}"


# -- the admin CLI -------------------------------------------------------------------------------------


def admin(store: Path, *args: str) -> dict[str, Any]:
    """``framewise admin ARGS --job-store STORE --json``; its JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "admin", *args, "--job-store", str(store), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"framewise admin {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout)


def admin_side_by_side(store: Path, commands: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """``framewise admin ARGS`` once per command, run side by side (each is a Python start):
    name -> the JSON it printed."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "admin", *args, "--job-store", str(store), "--json"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for name, args in commands.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"framewise admin {' '.join(commands[name])} exited {proc.returncode}: {stderr[-2000:]}"
        out[name] = json.loads(stdout)
    return out


def create_keys(store: Path, specs: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """``framewise admin keys create`` once per spec (its arguments after ``create``): name ->
    the JSON it printed (``key``, ``key_id``, ``tenant``, ``scopes``)."""
    made = admin_side_by_side(store, {name: ["keys", "create", *args] for name, args in specs.items()})
    for name, out in made.items():
        assert out["key"].startswith("fwk_"), (name, out)
    return made


# -- the server ------------------------------------------------------------------------------------------


@dataclass
class SecureServer:
    orchestrator: Orchestrator
    pki: Pki
    issuer: Issuer
    store: Path
    media_root: Path
    # name -> what `framewise admin keys create --json` printed
    keys: dict[str, dict[str, Any]]
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.orchestrator.address

    def key(self, name: str) -> str:
        return self.keys[name]["key"]

    def as_key(self, name: str) -> list[tuple[str, str]]:
        return bearer(self.key(name))

    def channel(self) -> grpc.Channel:
        """A TLS channel trusting the test CA (closed with the server)."""
        credentials = grpc.ssl_channel_credentials(root_certificates=self.pki.ca.read_bytes())
        channel = grpc.secure_channel(
            self.address,
            credentials,
            options=[("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.max_send_message_length", 64 * 1024 * 1024)],
        )
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def health(channel: grpc.Channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
    except grpc.RpcError:
        return None


def assert_serves(server: SecureServer, channel: grpc.Channel, key: str = "acme") -> None:
    """The next valid call after an attack is answered: overall health SERVING, and an
    authenticated GetServerInfo (through authentication, over TLS) lists the models."""
    assert server.orchestrator.process.poll() is None, f"the server exited:\n{server.orchestrator.log_text()[-3000:]}"
    assert health(channel) == health_pb2.HealthCheckResponse.SERVING
    info = info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(
        info_service_pb2.GetServerInfoRequest(), metadata=server.as_key(key), timeout=10
    )
    assert info.models, info


def media_tree(root: Path, tenants: Sequence[str]) -> None:
    """``<root>/<tenant>/bedroom.mp4`` per tenant (the per-tenant media roots), a file only one
    tenant has, and the escapes the inputs cases try: links out of a tenant's folder."""
    for tenant in tenants:
        (root / tenant).mkdir(parents=True, exist_ok=True)
        shutil.copy(ASSETS / "videos" / "bedroom.mp4", root / tenant / "bedroom.mp4")
    shutil.copy(ASSETS / "videos" / "05_default_juggle.mp4", root / "globex" / "secret.mp4")
    (root / "outside.mp4").write_bytes((ASSETS / "videos" / "bedroom.mp4").read_bytes()[:4096])
    # Inside acme's folder, each pointing out of it.
    (root / "acme" / "etc-passwd.mp4").symlink_to("/etc/passwd")
    (root / "acme" / "neighbour.mp4").symlink_to(root / "globex" / "secret.mp4")
    (root / "acme" / "relative-neighbour.mp4").symlink_to(Path("..") / "globex" / "secret.mp4")
    (root / "acme" / "up.mp4").symlink_to(Path("..") / "outside.mp4")
    (root / "acme" / "globex-dir").symlink_to(root / "globex", target_is_directory=True)
    (root / "acme" / "loop-a.mp4").symlink_to("loop-b.mp4")
    (root / "acme" / "loop-b.mp4").symlink_to("loop-a.mp4")

