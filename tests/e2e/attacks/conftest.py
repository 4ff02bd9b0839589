"""The attack catalogue's one server, shared by every attack file of this package: the real
orchestrator process (real Triton, the D-ID emulator) on a TLS port, authentication required
(API keys in its job store, made by `framewise admin keys create`; JWTs from the test issuer),
per-tenant media roots, and quota overrides set by `framewise admin quotas set`.

Each attack file uses its own tenants and keys, so the order the files run in changes nothing;
every case ends by checking that the server answers the next valid call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from did_emulator import EmulatorHandle
from tests.conftest import SHARED_MEMORY_ARGS, TritonProcess, job_args, start_orchestrator, stop_process, wait_until
from tests.e2e.attacks.secure_server import (
    AUDIENCE,
    ISSUER,
    KEY_CACHE_TTL_S,
    QUOTA_REFRESH_S,
    Issuer,
    SecureServer,
    admin_side_by_side,
    create_keys,
    health,
    media_tree,
)
from tests.tls_certs import make_pki

# Scope sets of the keys that lack one family each (the authorization cases).
ALL_BUT = {
    "vision": ("tracking", "jobs:read", "jobs:write"),
    "tracking": ("vision", "jobs:read", "jobs:write"),
    "jobs:read": ("vision", "tracking", "jobs:write"),
    "jobs:write": ("vision", "tracking", "jobs:read"),
}
# Quota overrides per tenant (`framewise admin quotas set --tenant T ARGS`).
QUOTA_TENANTS = {
    # 2 Detects at once, then one every 2 s.
    "quota-rate": ["--rate", "vision=0.5", "--burst", "vision=2"],
    "quota-sessions": ["--sessions", "1"],
    "quota-jobs": ["--jobs", "1"],
    "quota-storage": ["--storage-bytes", "150000"],
}
SESSION_IDLE_TTL_S = 60.0
JOB_WORKERS = 2
EXPIRING_KEY_S = 1


@pytest.fixture(scope="package")
def secure(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, did_emulator: EmulatorHandle
) -> Iterator[SecureServer]:
    tmp = tmp_path_factory.mktemp("secure")
    pki = make_pki(tmp / "pki")
    issuer = Issuer(tmp)
    media = tmp / "media"
    media_tree(media, ["acme", "globex", "quota-jobs"])
    store = tmp / "jobs.sqlite3"

    specs: dict[str, list[str]] = {
        "acme": ["--tenant", "acme"],
        "globex": ["--tenant", "globex"],
        "to-revoke": ["--tenant", "acme"],
        "expired": ["--tenant", "acme", "--expires-in", f"{EXPIRING_KEY_S}s"],
        **{f"no-{family}": ["--tenant", "acme", *(a for s in scopes for a in ("--scope", s))] for family, scopes in ALL_BUT.items()},
        **{tenant: ["--tenant", tenant] for tenant in QUOTA_TENANTS},
    }
    # The store is created (and migrated) by the first command; the rest then run side by side.
    keys = create_keys(store, {"acme": specs.pop("acme")})
    keys |= create_keys(store, specs)
    admin_side_by_side(store, {t: ["quotas", "set", "--tenant", t, *args] for t, args in QUOTA_TENANTS.items()})

    args = [
        "--triton-url", triton.url, *SHARED_MEMORY_ARGS, "--session-idle-ttl", str(SESSION_IDLE_TTL_S),
        *job_args(did_emulator),
        "--job-store", str(store), "--media-root", str(media),
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--auth", "required", "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE, "--jwks-file", str(issuer.jwks_file),
        "--auth-key-cache-ttl", str(KEY_CACHE_TTL_S), "--quota-refresh", str(QUOTA_REFRESH_S),
        # Two jobs at once: two long jobs hold every lane, so a third stays queued for as long
        # as a case needs (the symlink swapped between submit and run).
        "--job-workers", str(JOB_WORKERS),
    ]  # fmt: skip
    orch = start_orchestrator(tmp, args, name="secure")
    server = SecureServer(orch, pki, issuer, store, media, keys)
    probe = server.channel()
    try:
        wait_until(
            lambda: orch.process.poll() is None and health(probe) == health_pb2.HealthCheckResponse.SERVING,
            120,
            "the secure orchestrator to serve over TLS",
        )
    except AssertionError:
        server.close()
        stop_process(orch.process)
        raise AssertionError(f"secure orchestrator never served (exit {orch.process.returncode}); log:\n{orch.log_text()[-4000:]}") from None
    # The expiring key has expired by the time any case uses it.
    time.sleep(max(0.0, EXPIRING_KEY_S + 0.5))
    yield server
    server.close()
    stop_process(orch.process)


@pytest.fixture(scope="package")
def tls(secure: SecureServer) -> grpc.Channel:
    """One TLS channel to the secure server, for the cases that need nothing special."""
    return secure.channel()
