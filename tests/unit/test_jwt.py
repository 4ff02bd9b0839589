"""Bearer JWT verification (server/auth/jwt_bearer.py) with real signed tokens: keys are made
at run time (RSA, P-256, Ed25519) and tokens signed by joserfc, or by hand where an attacker
would forge one (alg=none, HS256 keyed with the server's public RSA key)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from server.auth.jwt_bearer import MAX_TOKEN_BYTES, JwtVerifier, load_jwks

ISSUER = "https://issuer.framewise.test"
AUDIENCE = "framewise-api"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
        "ec": ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
        "ed": OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
        # Signs nothing the server trusts: a stranger's key with a kid the server knows.
        "stranger": RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
    }


@pytest.fixture
def jwks_file(tmp_path: Path, keys: dict[str, Any]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [keys[n].as_dict(private=False) for n in ("rsa", "ec", "ed")]}))
    return path


@pytest.fixture
def verifier(jwks_file: Path) -> JwtVerifier:
    return JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file, leeway_s=30)


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-7", "iat": now, "exp": now + 300, "tenant": "acme",
            "scope": "vision jobs:read"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str, payload: dict[str, Any]) -> str:
    return jwt.encode({"alg": alg, "kid": key.kid}, payload, key, algorithms=[alg])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(("name", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA"), ("ed", "Ed25519")])
def test_a_token_signed_by_a_jwks_key_is_accepted(verifier: JwtVerifier, keys: dict[str, Any], name: str, alg: str) -> None:
    check = verifier.verify(sign(keys[name], alg, claims()))
    assert check.reason == "ok" and check.principal is not None
    assert (check.principal.tenant, check.principal.subject, check.principal.via) == ("acme", "user-7", "jwt")
    assert check.principal.scopes == {"vision", "jobs:read"}


def test_the_allowed_algorithms_are_pinned_to_the_key_types(verifier: JwtVerifier) -> None:
    assert set(verifier.algorithms) == {"RS256", "ES256", "EdDSA", "Ed25519"}


def test_an_expired_token_is_refused(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    now = int(time.time())
    check = verifier.verify(sign(keys["rsa"], "RS256", claims(iat=now - 600, exp=now - 60)))
    assert check.principal is None and "ExpiredTokenError" in check.reason


def test_leeway_accepts_a_token_that_expired_seconds_ago(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    now = int(time.time())
    assert verifier.verify(sign(keys["rsa"], "RS256", claims(iat=now - 600, exp=now - 5))).reason == "ok"


def test_a_token_without_exp_is_refused(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    check = verifier.verify(sign(keys["rsa"], "RS256", claims(exp=None)))
    assert check.principal is None and "MissingClaimError" in check.reason


def test_not_yet_valid_and_issued_in_the_future_are_refused(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    now = int(time.time())
    assert verifier.verify(sign(keys["rsa"], "RS256", claims(nbf=now + 600))).principal is None
    assert verifier.verify(sign(keys["rsa"], "RS256", claims(iat=now + 600))).principal is None


@pytest.mark.parametrize("field", ["iss", "aud"])
def test_the_wrong_issuer_or_audience_is_refused(verifier: JwtVerifier, keys: dict[str, Any], field: str) -> None:
    check = verifier.verify(sign(keys["ec"], "ES256", claims(**{field: "https://someone-else.test"})))
    assert check.principal is None and field in check.reason


def test_an_audience_list_containing_ours_is_accepted(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    assert verifier.verify(sign(keys["ec"], "ES256", claims(aud=["other", AUDIENCE]))).reason == "ok"


def test_a_wrong_signature_is_refused(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    # Signed by another key under the same kid.
    assert verifier.verify(sign(keys["stranger"], "RS256", claims())).principal is None
    # A valid token whose payload was changed after signing.
    header, _, signature = sign(keys["rsa"], "RS256", claims()).split(".")
    forged_payload = _b64(json.dumps(claims(tenant="victim")).encode())
    assert verifier.verify(f"{header}.{forged_payload}.{signature}").principal is None


def test_alg_none_is_refused(verifier: JwtVerifier) -> None:
    for header in ({"alg": "none"}, {"alg": "None"}, {"alg": "none", "kid": "rsa-1"}):
        token = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims()).encode())}."
        assert verifier.verify(token).principal is None


def test_hs256_keyed_with_the_public_rsa_key_is_refused(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    """The classic confusion: the attacker knows the public key (it is in the JWKS) and signs an
    HS256 token with its PEM (or its JWK JSON) as the HMAC secret."""
    public_pem = keys["rsa"].as_pem(private=False)
    public_jwk = json.dumps(keys["rsa"].as_dict(private=False)).encode()
    for secret in (public_pem, public_jwk):
        header = _b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims(tenant="victim")).encode())
        signature = _b64(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
        check = verifier.verify(f"{header}.{payload}.{signature}")
        assert check.principal is None and check.reason.startswith("invalid_jwt"), (secret[:20], check.reason)


def test_an_algorithm_that_does_not_match_the_key_is_refused(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    # ES256 header pointing at the RSA key's kid, signed with the EC key.
    token = jwt.encode({"alg": "ES256", "kid": "rsa-1"}, claims(), keys["ec"], algorithms=["ES256"])
    assert verifier.verify(token).principal is None
    # RS512 is a fine algorithm, but not one this JWKS pins.
    token = jwt.encode({"alg": "RS512", "kid": "rsa-1"}, claims(), keys["rsa"], algorithms=["RS512"])
    assert verifier.verify(token).principal is None


@pytest.mark.parametrize("tenant", [None, "", "../etc", "a/b", 7, "x" * 65])
def test_a_token_without_a_valid_tenant_is_refused(verifier: JwtVerifier, keys: dict[str, Any], tenant: Any) -> None:
    check = verifier.verify(sign(keys["rsa"], "RS256", claims(tenant=tenant)))
    assert check.principal is None and check.reason == "no_valid_tenant_claim"


def test_the_tenant_claim_is_configurable(jwks_file: Path, keys: dict[str, Any]) -> None:
    v = JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file, tenant_claim="org")
    check = v.verify(sign(keys["rsa"], "RS256", claims(tenant=None, org="globex")))
    assert check.principal is not None and check.principal.tenant == "globex"


def test_scopes_from_scp_and_unknown_scopes_dropped(verifier: JwtVerifier, keys: dict[str, Any]) -> None:
    check = verifier.verify(sign(keys["rsa"], "RS256", claims(scope=None, scp=["tracking", "root"])))
    assert check.principal is not None and check.principal.scopes == {"tracking"}
    check = verifier.verify(sign(keys["rsa"], "RS256", claims(scope=None)))
    assert check.principal is not None and check.principal.scopes == frozenset()


def test_an_oversized_token_is_refused_before_parsing(verifier: JwtVerifier) -> None:
    assert verifier.verify("a" * (MAX_TOKEN_BYTES + 1)).reason == "too_large"


def test_a_cached_token_still_expires(jwks_file: Path, keys: dict[str, Any]) -> None:
    now = [time.time()]
    v = JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file, leeway_s=0, clock=lambda: now[0])
    token = sign(keys["rsa"], "RS256", claims(exp=int(now[0]) + 10))
    assert v.verify(token).reason == "ok"
    assert v.verify(token).reason == "ok"  # from the cache
    now[0] += 11
    assert v.verify(token).principal is None


def test_a_rotated_jwks_file_is_picked_up(jwks_file: Path, keys: dict[str, Any]) -> None:
    v = JwtVerifier(issuer=ISSUER, audience=AUDIENCE, jwks_file=jwks_file, reload_interval_s=0)
    token = sign(keys["rsa"], "RS256", claims())
    assert v.verify(token).reason == "ok"
    jwks_file.write_text(json.dumps({"keys": [keys["ec"].as_dict(private=False)]}))
    import os

    os.utime(jwks_file, (time.time() + 5, time.time() + 5))
    assert v.verify(token).principal is None  # the RSA key is gone, and so is the cached verdict
    assert v.verify(sign(keys["ec"], "ES256", claims())).reason == "ok"


@pytest.mark.parametrize(
    ("keys_json", "message"),
    [
        ({"keys": []}, "non-empty"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "symmetric"),
        ({"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"}]}, "not an RSA"),
    ],
)
def test_unusable_jwks_files_are_refused(tmp_path: Path, keys_json: dict[str, Any], message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(keys_json))
    with pytest.raises(ValueError, match=message):
        load_jwks(path)


def test_a_jwks_with_a_private_key_is_refused(tmp_path: Path, keys: dict[str, Any]) -> None:
    path = tmp_path / "private.json"
    path.write_text(json.dumps({"keys": [keys["rsa"].as_dict(private=True)]}))
    with pytest.raises(ValueError, match="private"):
        load_jwks(path)


def test_a_key_alg_narrows_what_it_may_sign(tmp_path: Path, keys: dict[str, Any]) -> None:
    path = tmp_path / "jwks.json"
    ed = dict(keys["ed"].as_dict(private=False), alg="Ed25519")
    path.write_text(json.dumps({"keys": [ed]}))
    _, algorithms = load_jwks(path)
    assert algorithms == ("Ed25519",)
    path.write_text(json.dumps({"keys": [dict(keys["rsa"].as_dict(private=False), alg="HS256")]}))
    with pytest.raises(ValueError, match="RS256 only"):
        load_jwks(path)


def test_octkey_is_not_even_importable_from_a_public_key(keys: dict[str, Any]) -> None:
    """Belt and braces: joserfc itself refuses to make an HMAC key out of a public key."""
    with pytest.raises(ValueError):
        OctKey.import_key(keys["rsa"].as_pem(private=False))
