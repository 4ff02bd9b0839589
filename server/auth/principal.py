"""The principal an RPC runs as: its tenant, its scopes and how it proved who it is.

The authentication interceptor sets it for the duration of one call (a ContextVar set inside
the wrapped handler, so the servicer's task sees it and nothing outside the call does). Code
that owns tenant data (the job store, uploads, tracking sessions) takes the tenant as an
argument; only servicers call ``current_principal()``.
"""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

# The tenant of every call while authentication is off (a single-team, loopback-only server),
# and of the data written before tenancy existed.
DEFAULT_TENANT = "default"

# One scope per RPC family; "admin" covers the key and quota administration.
SCOPES: tuple[str, ...] = ("vision", "tracking", "jobs:read", "jobs:write", "admin")

# What a tenant name may be, wherever it comes from (an API key, a JWT claim, a certificate
# mapping): it names a folder (`<media_root>/<tenant>/`) and appears in logs, so it is short and
# path-safe: no "/", no "..", no leading dot.
_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_tenant(name: str) -> str:
    """``name`` when it is a valid tenant name; ValueError saying what one looks like otherwise."""
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            "a tenant name is 1-64 characters of letters, digits, '.', '_' and '-', starting with a letter "
            "or digit, without '..'"
        )
    return name


@dataclass(frozen=True)
class Principal:
    """Who a call runs as."""

    tenant: str
    # What identifies the credential in logs and audit lines (an API key id, a JWT subject, a
    # certificate subject): never the secret itself.
    subject: str
    scopes: frozenset[str]
    # "api_key", "jwt", "mtls" or "anonymous" (authentication off).
    via: str

    def allows(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def has_quotas(self) -> bool:
        """Quotas are per tenant. While authentication is off there are no tenants, one team
        behind a loopback address: the server's own bounds (--max-tracking-sessions,
        --max-queued-jobs) are its limits, not the default tenant's quotas."""
        return self.via != "anonymous"


ANONYMOUS = Principal(tenant=DEFAULT_TENANT, subject="anonymous", scopes=frozenset(SCOPES), via="anonymous")

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("framewise_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the call in progress; ANONYMOUS when authentication is off."""
    return _current.get()


def bind_principal(principal: Principal) -> contextvars.Token[Principal]:
    """Called by the authentication interceptor around one call; reset with the token after."""
    return _current.set(principal)


def unbind_principal(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)
