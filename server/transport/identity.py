"""A client certificate's identity, as gRPC verified it (mutual TLS).

For the authentication layer (server/auth/): when the port requires client certificates
(--tls-client-ca, --tls-client-auth require), every call's auth context carries the subject of
the certificate the client presented, already verified against the client CA during the TLS
handshake (a certificate that does not chain to that CA never gets a connection). The auth
layer maps that identity to a tenant, e.g. the SAN "spiffe://example.org/tenant/acme" or the
common name "acme".

    identity = client_identity_of(context)   # inside a handler: grpc.aio.ServicerContext
    if identity is not None:
        tenant = my_mapping.get(identity.common_name) ...

Where the values come from: gRPC's TLS security connector fills the auth context with the keys
"x509_common_name" (the subject CN), "x509_subject" (the whole subject, RFC 2253),
"x509_subject_alternative_name" (every SAN: DNS names, URIs, emails, IPs) and "peer_uri" /
"peer_dns" (per SAN type). They appear only for a verified peer certificate: without mTLS (no
client CA, or plaintext) the auth context has none of them and this returns None. Behind a
TLS-terminating proxy (HAProxy in the cluster), the replica sees the proxy, not the client:
client-certificate identity then needs TLS passed through to the replicas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ClientIdentity", "client_identity", "client_identity_of"]


class _HasAuthContext(Protocol):
    def auth_context(self) -> Mapping[str, Iterable[bytes]]: ...


@dataclass(frozen=True)
class ClientIdentity:
    """Who the verified client certificate names."""

    # The subject's common name ("" when the subject has none).
    common_name: str
    # The whole subject, RFC 2253 ("CN=acme,O=Example").
    subject: str
    # Every subject alternative name, in certificate order (DNS names, URIs, emails, IPs).
    sans: tuple[str, ...]
    # The URI SANs alone (SPIFFE IDs live here).
    uris: tuple[str, ...]
    # The DNS-name SANs alone.
    dns_names: tuple[str, ...]

    @property
    def name(self) -> str:
        """One stable name for logs and audit lines: the first URI SAN (a SPIFFE ID names a
        workload precisely), else the common name, else the first SAN."""
        for candidate in (*self.uris[:1], self.common_name, *self.sans[:1]):
            if candidate:
                return candidate
        return self.subject


def _texts(values: Iterable[bytes] | None) -> tuple[str, ...]:
    return tuple(v.decode("utf-8", "replace") for v in values or ())


def client_identity(auth_context: Mapping[str, Iterable[bytes]]) -> ClientIdentity | None:
    """The verified client certificate's identity from a gRPC auth context (the mapping
    ``ServicerContext.auth_context()`` returns); None when the call carries no verified client
    certificate (plaintext, TLS without client certificates)."""
    if b"ssl" not in tuple(auth_context.get("transport_security_type", ())):
        return None
    common = _texts(auth_context.get("x509_common_name"))
    subject = _texts(auth_context.get("x509_subject"))
    sans = _texts(auth_context.get("x509_subject_alternative_name"))
    if not (common or subject or sans):
        return None
    return ClientIdentity(
        common_name=common[0] if common else "",
        subject=subject[0] if subject else "",
        sans=sans,
        uris=_texts(auth_context.get("peer_uri")),
        dns_names=_texts(auth_context.get("peer_dns")),
    )


def client_identity_of(context: _HasAuthContext) -> ClientIdentity | None:
    """client_identity of a call's ``grpc.aio.ServicerContext`` (or a sync one)."""
    return client_identity(context.auth_context())
