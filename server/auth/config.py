"""The authentication flags (each with a FRAMEWISE_* environment fallback) and AuthConfig.

server/config.py adds these flags to the server's parser and keeps the result in
``ServerConfig.auth``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.auth.scopes import DEFAULT_OPEN_PREFIXES

__all__ = ["AUTH_MODES", "AuthConfig", "add_auth_flags", "auth_config_from_args"]

# off: every call runs as the anonymous principal of the "default" tenant (a loopback-only
# single-team server). required: every call but the open methods needs a credential. auto
# (default): required as soon as a key exists in the store, a JWT issuer or an mTLS tenant map
# is configured; off before that.
AUTH_MODES: tuple[str, ...] = ("off", "auto", "required")


@dataclass(frozen=True)
class AuthConfig:
    mode: str = "auto"
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwks_file: Path | None = None
    # The claim that names the caller's tenant.
    jwt_tenant_claim: str = "tenant"
    # Seconds of clock skew allowed on exp, nbf and iat.
    jwt_leeway_s: int = 30
    # Method-name prefixes answered without credentials (health checks, reflection).
    open_methods: tuple[str, ...] = DEFAULT_OPEN_PREFIXES
    # JSON file: client certificate identity -> tenant (server/auth/mtls.py); None: no mapping.
    mtls_tenant_map: Path | None = None
    # Seconds an API key read from the store is reused before it is read again: the longest a
    # revocation made elsewhere takes to hold here (server/auth/key_verifier.py). 0: every call.
    key_cache_ttl_s: float = 2.0

    @property
    def jwt_enabled(self) -> bool:
        return self.jwt_issuer is not None


def _env(name: str, default: object) -> str | None:
    value = os.environ.get(f"FRAMEWISE_{name}")
    return value if value is not None else (None if default is None else str(default))


def add_auth_flags(p: argparse.ArgumentParser, d: AuthConfig = AuthConfig()) -> None:
    g = p.add_argument_group("authentication")
    g.add_argument("--auth", choices=AUTH_MODES, default=_env("AUTH", d.mode),
                   help="off: no credentials (loopback only); required: every call but health and reflection needs "
                        "'authorization: Bearer <API key or JWT>'; auto (default): required once an API key exists in "
                        "the job store or a JWT issuer / mTLS tenant map is configured (FRAMEWISE_AUTH)")
    g.add_argument("--jwt-issuer", default=_env("JWT_ISSUER", d.jwt_issuer),
                   help="accept bearer JWTs from this issuer (the exact 'iss'); needs --jwt-audience and --jwks-file")
    g.add_argument("--jwt-audience", default=_env("JWT_AUDIENCE", d.jwt_audience),
                   help="the 'aud' a JWT must carry (FRAMEWISE_JWT_AUDIENCE)")
    g.add_argument("--jwks-file", type=Path, default=_env("JWKS_FILE", d.jwks_file),
                   help="JSON Web Key Set with the issuer's public keys (RSA, P-256 or Ed25519); re-read when it "
                        "changes (FRAMEWISE_JWKS_FILE)")
    g.add_argument("--jwt-tenant-claim", default=_env("JWT_TENANT_CLAIM", d.jwt_tenant_claim),
                   help="the JWT claim that names the caller's tenant (default: tenant)")
    g.add_argument("--jwt-leeway", type=int, default=_env("JWT_LEEWAY", d.jwt_leeway_s),
                   help="seconds of clock skew allowed on exp/nbf/iat (default 30)")
    g.add_argument("--auth-open-methods", default=_env("AUTH_OPEN_METHODS", ",".join(d.open_methods)),
                   help="comma-separated method-name prefixes answered without credentials (default: health and "
                        "reflection); empty: every method needs credentials (FRAMEWISE_AUTH_OPEN_METHODS)")
    g.add_argument("--mtls-tenant-map", type=Path, default=_env("MTLS_TENANT_MAP", d.mtls_tenant_map),
                   help="JSON file mapping a verified client certificate's identity (URI/DNS SAN, CN or subject) to "
                        "a tenant, or to {\"tenant\", \"scopes\"} (FRAMEWISE_MTLS_TENANT_MAP)")
    g.add_argument("--auth-key-cache-ttl", type=float, default=_env("AUTH_KEY_CACHE_TTL", d.key_cache_ttl_s),
                   help="seconds an API key read from the job store is reused: the longest a revocation made on "
                        "another replica or by `framewise admin` takes to hold here (default 2; 0: read every call)")


def auth_config_from_args(a: argparse.Namespace, error: Callable[[str], object]) -> AuthConfig:
    """AuthConfig from parsed flags; ``error`` (the parser's) for a combination that cannot work."""
    issuer = a.jwt_issuer or None
    audience = a.jwt_audience or None
    jwks = Path(a.jwks_file) if a.jwks_file else None
    if issuer is not None and (audience is None or jwks is None):
        error("--jwt-issuer needs --jwt-audience and --jwks-file (the tokens' audience and the issuer's public keys)")
    if issuer is None and (audience is not None or jwks is not None):
        error("--jwt-audience and --jwks-file need --jwt-issuer")
    if a.jwt_leeway < 0 or a.jwt_leeway > 300:
        error(f"--jwt-leeway must be within 0..300 seconds, got {a.jwt_leeway}")
    if a.auth_key_cache_ttl < 0 or a.auth_key_cache_ttl > 60:
        error(f"--auth-key-cache-ttl must be within 0..60 seconds, got {a.auth_key_cache_ttl}")
    open_methods = tuple(m.strip() for m in str(a.auth_open_methods or "").split(",") if m.strip())
    for m in open_methods:
        if not m.startswith("/"):
            error(f"--auth-open-methods: {m!r} is not a method-name prefix (they start with '/', e.g. /grpc.health.v1.Health/)")
    return AuthConfig(
        mode=a.auth,
        jwt_issuer=issuer,
        jwt_audience=audience,
        jwks_file=jwks,
        jwt_tenant_claim=a.jwt_tenant_claim,
        jwt_leeway_s=a.jwt_leeway,
        open_methods=open_methods,
        mtls_tenant_map=Path(a.mtls_tenant_map) if a.mtls_tenant_map else None,
        key_cache_ttl_s=a.auth_key_cache_ttl,
    )
