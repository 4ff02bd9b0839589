"""Client certificate identity -> tenant (mutual TLS).

The TLS layer (server/transport/identity.py) hands over the identity gRPC verified against the
client CA; this module maps it to a tenant and scopes with a JSON file (``--mtls-tenant-map``):

    {
      "spiffe://example.org/ns/acme/sa/render": {"tenant": "acme", "scopes": ["vision", "jobs:read"]},
      "batch-client.acme.example": "acme"
    }

A key matches only the field of the certificate its form names, so that a value a client can
choose in one field never passes for another field's identity (a CA that lets requesters pick
their common name would otherwise sign a CN spelling someone's SPIFFE ID):

    uri:X, or X containing "://"   a URI SAN (SPIFFE IDs)
    subject:X, or X containing "="  the whole subject, RFC 2253 ("CN=svc,O=Acme")
    cn:X                           the common name only
    dns:X                          a DNS (or email, IP) SAN only
    X otherwise                    a DNS / email / IP SAN, or the common name (a host name)

The URI SANs are tried first, then the other SANs, the common name and the subject; the first
match wins. A bare tenant string grants the default scopes (every scope but ``admin``). A
certificate whose identity is not in the map authenticates nobody (it still has to present a
key or JWT).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.auth.principal import SCOPES, Principal, check_tenant
from server.transport.identity import ClientIdentity

__all__ = ["DEFAULT_SCOPES", "TenantMap", "load_tenant_map"]

# What a credential gets when nobody said otherwise: everything but administration.
DEFAULT_SCOPES: tuple[str, ...] = tuple(s for s in SCOPES if s != "admin")


@dataclass(frozen=True)
class _Grant:
    tenant: str
    scopes: frozenset[str]


# The certificate fields a key may match, by the key's form (see the module docstring).
_FIELDS = ("uri", "san", "cn", "subject")


def _typed(key: str) -> tuple[tuple[str, ...], str]:
    """(the fields ``key`` may match, the value to match)."""
    prefix, _, rest = key.partition(":")
    if rest and prefix in ("uri", "subject", "cn", "dns"):
        return ({"dns": ("san",)}.get(prefix, (prefix,)), rest)
    if "://" in key:
        return ("uri",), key
    if "=" in key:
        return ("subject",), key
    return ("san", "cn"), key


class TenantMap:
    def __init__(self, grants: Mapping[str, _Grant]) -> None:
        # field -> value -> grant
        self._by_field: dict[str, dict[str, _Grant]] = {f: {} for f in _FIELDS}
        for key, grant in grants.items():
            fields, value = _typed(key)
            for f in fields:
                self._by_field[f][value] = grant
        self._size = len(grants)

    def __len__(self) -> int:
        return self._size

    def principal(self, identity: ClientIdentity) -> Principal | None:
        uris = set(identity.uris)
        candidates = [
            *(("uri", u) for u in identity.uris),
            *(("san", n) for n in identity.sans if n not in uris),
            ("cn", identity.common_name),
            ("subject", identity.subject),
        ]
        for field, value in candidates:
            grant = self._by_field[field].get(value) if value else None
            if grant is not None:
                return Principal(tenant=grant.tenant, subject=value, scopes=grant.scopes, via="mtls")
        return None


def load_tenant_map(path: Path) -> TenantMap:
    """ValueError naming the entry that is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the mTLS tenant map {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the mTLS tenant map is a JSON object from certificate identity to tenant")
    grants: dict[str, _Grant] = {}
    for identity, value in data.items():
        if isinstance(value, str):
            tenant, scopes = value, DEFAULT_SCOPES
        elif isinstance(value, dict) and isinstance(value.get("tenant"), str):
            tenant = value["tenant"]
            scopes = value.get("scopes", DEFAULT_SCOPES)
            if not isinstance(scopes, list | tuple) or not all(s in SCOPES for s in scopes):
                raise ValueError(f"{path}: {identity!r}: scopes must be a list of {', '.join(SCOPES)}")
        else:
            raise ValueError(f"{path}: {identity!r}: give a tenant name or {{\"tenant\": ..., \"scopes\": [...]}}")
        try:
            check_tenant(tenant)
        except ValueError as exc:
            raise ValueError(f"{path}: {identity!r}: {exc}") from exc
        grants[identity] = _Grant(tenant, frozenset(scopes))
    return TenantMap(grants)
