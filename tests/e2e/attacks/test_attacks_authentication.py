"""Attacks on authentication, against the real server over TLS with authentication required:
every RPC without credentials, API keys that are revoked, expired, unknown, forged or sent the
wrong way, and JWTs that are expired, from another issuer or audience, badly signed, unsigned
(alg=none) or forged with the server's public key as an HMAC secret (HS256 confusion).

Each refusal must be UNAUTHENTICATED saying what the server expects, never why the presented
credential failed (the same words for every refused credential), and the server must answer
the next valid call. Positive controls (a valid key, a valid JWT) show the refusals are not a
server that refuses everything.
"""

from __future__ import annotations

import time

import grpc
import pytest
from google.longrunning import operations_pb2

from server.auth.keys import KEY_LENGTH, KEY_PREFIX, parse_key
from tests.e2e.attacks.conftest import ALL_BUT
from tests.e2e.attacks.secure_server import (
    KEY_CACHE_TTL_S,
    Rpc,
    SecureServer,
    admin,
    all_rpcs,
    assert_serves,
    bearer,
    invoke,
    refusal,
)

RPCS = all_rpcs()
LIST = next(r for r in RPCS if r.name == "ListOperations")
EXPECTED = "authorization: Bearer"
# Words a refusal must never contain: they would tell a guesser why the credential failed.
TELLS = ("revoked", "expired", "signature", "issuer", "audience", "secret", "unknown key", "alg", "tenant", "scope")


def test_the_catalogue_covers_every_rpc_of_every_service() -> None:
    """The descriptors the catalogue enumerates are the services the server registers."""
    from server.services import OPERATIONS_SERVICE, SERVICES

    served = {d.full_name for d in SERVICES.values()} | {OPERATIONS_SERVICE}
    assert {r.service for r in RPCS} == served
    assert len(RPCS) == sum(len(d.methods) for d in SERVICES.values()) + 5  # + the 5 Operations RPCs


@pytest.mark.parametrize("rpc", RPCS, ids=str)
def test_every_rpc_without_credentials_is_unauthenticated(secure: SecureServer, tls: grpc.Channel, rpc: Rpc) -> None:
    error = refusal(lambda: invoke(tls, rpc))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    assert EXPECTED in error.details(), error.details()
    assert_serves(secure, tls)


def test_health_is_open_without_credentials(secure: SecureServer, tls: grpc.Channel) -> None:
    """The one family left open by default (a load balancer's probe carries no key)."""
    assert_serves(secure, tls)


def _list(tls: grpc.Channel, metadata: list[tuple[str, str]]) -> operations_pb2.ListOperationsResponse:
    return invoke(tls, LIST, operations_pb2.ListOperationsRequest(), metadata=metadata)[0]  # type: ignore[return-value]


def _refused_credential(secure: SecureServer, tls: grpc.Channel, metadata: list[tuple[str, str]]) -> str:
    """ListOperations (tenant data) with ``metadata``: UNAUTHENTICATED without a reason; the
    server serves after it. Returns the message."""
    error = refusal(lambda: _list(tls, metadata))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (error.code(), error.details())
    details = error.details() or ""
    assert EXPECTED in details, details
    assert not any(tell in details.lower() for tell in TELLS), details
    assert_serves(secure, tls)
    return details


# -- API keys -----------------------------------------------------------------------------------------


def test_a_valid_api_key_is_accepted(secure: SecureServer, tls: grpc.Channel) -> None:
    _list(tls, secure.as_key("acme"))
    assert_serves(secure, tls)


def test_a_revoked_key_is_refused(secure: SecureServer, tls: grpc.Channel) -> None:
    metadata = secure.as_key("to-revoke")
    _list(tls, metadata)  # works before
    revoked = admin(secure.store, "keys", "revoke", secure.keys["to-revoke"]["key_id"])
    assert revoked["revoked"]
    time.sleep(KEY_CACHE_TTL_S + 0.5)  # the server's cached record of the key ages out
    _refused_credential(secure, tls, metadata)


def test_an_expired_key_is_refused(secure: SecureServer, tls: grpc.Channel) -> None:
    _refused_credential(secure, tls, secure.as_key("expired"))


def test_an_unknown_key_id_is_refused(secure: SecureServer, tls: grpc.Channel) -> None:
    key = secure.key("acme")
    _refused_credential(secure, tls, bearer("fwk_" + "0123456789ab" + key[16:]))


def test_a_known_key_id_with_a_guessed_secret_is_refused(secure: SecureServer, tls: grpc.Channel) -> None:
    key = secure.key("acme")
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    _refused_credential(secure, tls, bearer(forged))


def test_a_truncated_key_is_refused(secure: SecureServer, tls: grpc.Channel) -> None:
    _refused_credential(secure, tls, bearer(secure.key("acme")[:-8]))


def test_the_same_words_for_every_refused_key(secure: SecureServer, tls: grpc.Channel) -> None:
    """Unknown id, wrong secret and expired key read alike: a guesser learns nothing."""
    key = secure.key("acme")
    messages = {
        _refused_credential(secure, tls, bearer("fwk_" + "ffffffffffff" + key[16:])),
        _refused_credential(secure, tls, bearer(key[:-1] + ("A" if key[-1] != "A" else "B"))),
        _refused_credential(secure, tls, secure.as_key("expired")),
    }
    assert len(messages) == 1, messages


# -- malformed authorization metadata ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda key: [("authorization", f"Basic {key}")], id="basic-scheme"),
        pytest.param(lambda key: [("authorization", key)], id="no-scheme"),
        pytest.param(lambda key: [("authorization", "Bearer")], id="bearer-without-token"),
        pytest.param(lambda key: [("authorization", "Bearer     ")], id="bearer-blank-token"),
        pytest.param(lambda key: [("authorization", f"Bearer {key} {key}")], id="two-tokens"),
        pytest.param(lambda key: [("authorization", f"Bearer {key}"), ("authorization", "Bearer x")], id="two-headers"),
        pytest.param(lambda key: [("authorization", "Bearer ' OR 1=1 --")], id="sql-in-token"),
        pytest.param(lambda key: [("authorization", "Bearer fwk_../../etc/passwd_x")], id="path-in-key-id"),
        pytest.param(lambda key: [("authorization", "Bearer a.b.c")], id="three-dots-not-a-jwt"),
    ],
)
def test_a_malformed_authorization_header_is_refused(secure: SecureServer, tls: grpc.Channel, make) -> None:  # noqa: ANN001
    _refused_credential(secure, tls, make(secure.key("acme")))


def test_a_key_in_another_header_is_not_a_credential(secure: SecureServer, tls: grpc.Channel) -> None:
    """Only ``authorization`` carries credentials: a key in x-api-key is as good as none."""
    error = refusal(lambda: _list(tls, [("x-api-key", secure.key("acme"))]))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert_serves(secure, tls)


# -- JWTs ----------------------------------------------------------------------------------------------


def test_a_valid_jwt_is_accepted_as_its_tenant(secure: SecureServer, tls: grpc.Channel) -> None:
    _list(tls, bearer(secure.issuer.token("acme")))
    assert_serves(secure, tls)


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda i: i.token("acme", exp=int(time.time()) - 300, iat=int(time.time()) - 900), id="expired"),
        pytest.param(lambda i: i.token("acme", iss="https://evil.example"), id="wrong-issuer"),
        pytest.param(lambda i: i.token("acme", aud="some-other-service"), id="wrong-audience"),
        pytest.param(lambda i: i.token("acme", aud=None), id="no-audience"),
        pytest.param(lambda i: i.token("acme", exp=None), id="no-expiry"),
        pytest.param(lambda i: i.token("acme", nbf=int(time.time()) + 600), id="not-yet-valid"),
        pytest.param(lambda i: i.sign(i.claims("acme"), key=i.attacker_key), id="signed-by-another-key"),
        pytest.param(lambda i: i.sign(i.claims("acme"), key=i.attacker_key, kid="unknown-kid"), id="unknown-kid"),
        pytest.param(lambda i: i.tampered("acme", "globex"), id="payload-rewritten"),
        pytest.param(lambda i: i.unsigned(i.claims("acme")), id="alg-none"),
        pytest.param(lambda i: i.hs256_with_public_key(i.claims("acme")), id="hs256-with-rsa-public-key"),
        pytest.param(lambda i: i.token("acme", tenant=None), id="no-tenant-claim"),
        pytest.param(lambda i: i.token("../globex"), id="path-traversal-tenant"),
    ],
)
def test_a_bad_jwt_is_refused(secure: SecureServer, tls: grpc.Channel, forge) -> None:  # noqa: ANN001
    _refused_credential(secure, tls, bearer(forge(secure.issuer)))


def test_a_jwt_without_the_scope_is_permission_denied(secure: SecureServer, tls: grpc.Channel) -> None:
    token = secure.issuer.token("acme", scope=" ".join(ALL_BUT["jobs:read"]))
    error = refusal(lambda: _list(tls, bearer(token)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (error.code(), error.details())
    assert "'jobs:read'" in (error.details() or "")
    assert_serves(secure, tls)


# -- transport ---------------------------------------------------------------------------------------


def test_plaintext_to_the_tls_port_never_reaches_a_handler(secure: SecureServer, tls: grpc.Channel) -> None:
    """A client that skips TLS (with a valid key) gets no answer from any RPC."""
    with grpc.insecure_channel(secure.address) as plain:
        error = refusal(lambda: _list(plain, secure.as_key("acme")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert_serves(secure, tls)


def test_a_client_trusting_another_ca_refuses_the_server(secure: SecureServer, tls: grpc.Channel) -> None:
    """The server's certificate is what the client checks: a client given another CA (a
    man-in-the-middle's view of this server) never sends its key."""
    credentials = grpc.ssl_channel_credentials(root_certificates=secure.pki.stranger_ca.read_bytes())
    with grpc.secure_channel(secure.address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]) as other:
        error = refusal(lambda: _list(other, secure.as_key("acme")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert_serves(secure, tls)


# -- slowing guessers, and what the server writes down --------------------------------------------------


def test_repeated_failures_from_one_peer_are_slowed(secure: SecureServer, tls: grpc.Channel) -> None:
    """After a run of refused guesses from this address, the next refusal waits (the backoff
    doubles per recent failure, up to its cap); a valid call in between is answered."""
    key = secure.key("acme")
    for i in range(7):
        refusal(lambda i=i: _list(tls, bearer(f"fwk_{i:012x}{key[16:]}")))
    _list(tls, secure.as_key("acme"))  # a valid call from the same peer still works
    started = time.monotonic()
    error = refusal(lambda: _list(tls, bearer("fwk_" + "e" * 12 + key[16:])))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started >= 0.5, "the eighth refused guess in a row was answered without delay"
    assert_serves(secure, tls)


def test_refusals_are_audited_and_no_secret_reaches_the_log(secure: SecureServer, tls: grpc.Channel) -> None:
    """One auth_failure line per refusal (key id, method, peer), never a key or a token."""
    forged = secure.key("globex")[:-2] + "zz"
    refusal(lambda: _list(tls, bearer(forged)))
    token = secure.issuer.token("acme", aud="elsewhere")
    refusal(lambda: _list(tls, bearer(token)))
    time.sleep(0.3)  # the log line is written as the call ends
    text = secure.orchestrator.log_text()
    failures = [r for r in secure.orchestrator.log_records() if r.get("event") == "auth_failure"]
    assert any(r.get("key_id") == secure.keys["globex"]["key_id"] for r in failures), failures[-3:]
    assert all(r.get("method") and r.get("peer") for r in failures)
    for secret in [forged, token, *(k["key"] for k in secure.keys.values())]:
        assert secret not in text
        assert _secret_part(secret) not in text  # not even the secret part of a key, or a token's signature
    assert_serves(secure, tls)


# fwk_ + 12 hex characters of key id + "_": the rest of a key is its secret.
KEY_SECRET_CHARS = KEY_LENGTH - len(KEY_PREFIX) - 12 - 1


def _secret_part(credential: str) -> str:
    """What must never be logged: a key's random part (``fwk_<id>_<43 characters>``, which may
    themselves contain "_"), or a JWT's signature."""
    if parse_key(credential) is not None:
        return credential[-KEY_SECRET_CHARS:]
    return credential.rsplit(".", 1)[-1]
