"""Bearer JWTs, verified with joserfc against one issuer, one audience and a JWKS file.

What is refused, and why:

* ``alg`` is pinned to what the JWKS keys are: RS256 for RSA keys, ES256 for P-256 keys, EdDSA
  (or its RFC 9864 name Ed25519) for Ed25519 keys, nothing else; a key's own "alg" narrows it. So ``alg: none`` is refused, and so is the classic confusion
  attack (an HS256 token whose HMAC secret is the server's *public* RSA key): HS256 is never
  an allowed algorithm, and the JWKS file may hold no symmetric ("oct") key at all.
* A JWKS holding a private key is refused at load: a verifier needs only public keys, and a
  private key lying in a server's configuration is a leak waiting to happen.
* ``iss`` and ``aud`` must match the configured ones; ``exp`` is required; ``exp``, ``nbf`` and
  ``iat`` are checked with a small leeway (default 30 s) for clock skew.
* The tenant comes from one claim (``--jwt-tenant-claim``, default ``tenant``) and must be a
  valid tenant name; scopes from ``scope`` (space-separated) or ``scp`` (a list or a string),
  keeping the scopes this server knows.
* Tokens over 8 KiB are refused before parsing.
* With more than one key in the JWKS a token must name its key (``kid``): joserfc does not try
  each key in turn, and neither should a verifier.

A verified token is remembered (by its exact text, at most ``max_cached`` of them) until its
``exp``: a client sends the same token on every call, and one ES256 check costs 0.22-0.30 ms
here (RS256 0.11-0.15 ms), most of the per-call budget; a repeat costs ~1.5 µs. A JWT cannot be revoked before its ``exp`` anyway; a JWKS reload
forgets them all.

The JWKS file is read again when it changes (checked at most every ``reload_interval_s``), so
a key rotation needs no restart; a file that fails to parse keeps the keys loaded before.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from server.auth.principal import SCOPES, Principal, check_tenant

__all__ = ["MAX_TOKEN_BYTES", "JwtCheck", "JwtVerifier", "load_jwks"]

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8192

# Key type (and curve) -> the algorithms a token signed by such a key may name. Ed25519 has two
# names: "EdDSA" (RFC 8037) and "Ed25519" (RFC 9864's fully-specified one, which joserfc prefers).
_ALGORITHMS = {("RSA", None): ("RS256",), ("EC", "P-256"): ("ES256",), ("OKP", "Ed25519"): ("EdDSA", "Ed25519")}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


class JwtCheck(NamedTuple):
    principal: Principal | None
    subject: str
    reason: str  # "ok", or what failed (for the audit line only)
    tenant: str = ""


def load_jwks(path: Path) -> tuple[KeySet, tuple[str, ...]]:
    """The key set in ``path`` and the algorithms its keys allow. ValueError with what is wrong
    (no keys, a symmetric key, a private key, an unsupported key type)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the JWKS file {path}: {exc}") from exc
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{path} is not a JWKS (a JSON object with a non-empty \"keys\" list)")
    algorithms: set[str] = set()
    for i, key in enumerate(keys):
        if not isinstance(key, dict):
            raise ValueError(f"{path}: key {i} is not a JSON object")
        kty = key.get("kty")
        if kty == "oct":
            raise ValueError(f"{path}: key {i} is a symmetric (oct) key; a JWKS for verifying tokens holds public keys only")
        if any(m in key for m in _PRIVATE_MEMBERS):
            raise ValueError(f"{path}: key {i} contains private key material; give the public keys only")
        allowed = _ALGORITHMS.get((kty, key.get("crv") if kty != "RSA" else None))
        if allowed is None:
            raise ValueError(f"{path}: key {i} ({kty} {key.get('crv', '')}) is not an RSA, P-256 or Ed25519 key")
        if "alg" in key:
            if key["alg"] not in allowed:
                raise ValueError(f"{path}: key {i} names alg {key['alg']!r}; a {kty} key here signs with {' or '.join(allowed)} only")
            allowed = (key["alg"],)
        algorithms.update(allowed)
    try:
        key_set = KeySet.import_key_set(data)
    except JoseError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return key_set, tuple(sorted(algorithms))


class JwtVerifier:
    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_file: Path,
        tenant_claim: str = "tenant",
        leeway_s: int = 30,
        reload_interval_s: float = 5.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not issuer or not audience:
            raise ValueError("a JWT verifier needs both an issuer and an audience")
        self.issuer = issuer
        self.audience = audience
        self.jwks_file = Path(jwks_file)
        self.tenant_claim = tenant_claim
        self.leeway_s = int(leeway_s)
        self._clock = clock
        self._reload_interval = reload_interval_s
        self._keys, self.algorithms = load_jwks(self.jwks_file)
        self._mtime = self._stat()
        self._checked = time.monotonic()
        self._max_cached = max_cached
        # token -> (the principal it proved, the time (clock) after which it no longer does)
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()

    def verify(self, token: str) -> JwtCheck:
        """Synchronous: one signature check is tens of microseconds, less than a thread hop."""
        if len(token) > MAX_TOKEN_BYTES:
            return JwtCheck(None, "", "too_large")
        self._maybe_reload()
        now = self._clock()
        hit = self._verified.get(token)
        if hit is not None:
            if now < hit[1]:
                return JwtCheck(hit[0], hit[0].subject, "ok", hit[0].tenant)
            del self._verified[token]
        try:
            decoded = jwt.decode(token, self._keys, algorithms=list(self.algorithms))
        except (JoseError, ValueError, TypeError) as exc:
            return JwtCheck(None, "", f"invalid_jwt:{type(exc).__name__}")
        claims = decoded.claims
        subject = claims.get("sub") if isinstance(claims.get("sub"), str) else ""
        registry = jwt.JWTClaimsRegistry(
            now=int(now),
            leeway=self.leeway_s,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as exc:
            return JwtCheck(None, subject, f"claims:{type(exc).__name__}:{getattr(exc, 'claim', '')}")
        tenant = claims.get(self.tenant_claim)
        try:
            check_tenant(tenant)  # type: ignore[arg-type]
        except ValueError:
            return JwtCheck(None, subject, "no_valid_tenant_claim")
        principal = Principal(tenant=tenant, subject=subject or "jwt", scopes=_scopes(claims), via="jwt")
        # Valid while now < exp + leeway (what validate_exp accepts); nbf/iat already passed.
        self._verified[token] = (principal, float(claims["exp"]) + self.leeway_s)
        while len(self._verified) > self._max_cached:
            self._verified.popitem(last=False)
        return JwtCheck(principal, principal.subject, "ok", tenant)

    def _stat(self) -> float:
        try:
            return self.jwks_file.stat().st_mtime
        except OSError:
            return -1.0

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._reload_interval:
            return
        self._checked = now
        mtime = self._stat()
        if mtime == self._mtime:
            return
        self._mtime = mtime
        try:
            self._keys, self.algorithms = load_jwks(self.jwks_file)
            self._verified.clear()
            log.info("JWKS reloaded", extra={"jwks_file": str(self.jwks_file), "algorithms": list(self.algorithms)})
        except ValueError as exc:
            log.error("JWKS file changed but cannot be used; keeping the keys loaded before", extra={"error": str(exc)})


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    raw = claims.get("scope")
    if raw is None:
        raw = claims.get("scp")
    if isinstance(raw, str):
        names = raw.split()
    elif isinstance(raw, list):
        names = [s for s in raw if isinstance(s, str)]
    else:
        names = []
    return frozenset(s for s in names if s in SCOPES)
