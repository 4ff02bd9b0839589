"""The audit trail: one structured line on the ``server.audit`` logger per authentication
failure, refused scope, API key creation and revocation, and cross-tenant attempt. Each line
names the key id (or JWT subject, certificate identity), the tenant, the method and the peer;
never a secret: a presented token is not logged, not even in part.

The authentication interceptor binds the call's method and peer (``bind_call``) so that a
servicer that notices another tenant's resource only calls ``cross_tenant(...)``; the
interceptor then counts the attempt in ``framewise_auth_total{outcome="cross_tenant"}`` when
the call ends.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a servicer importing the audit functions pulls in no store code
    from server.jobs.store.protocol import ApiKeyRecord

__all__ = [
    "CallInfo",
    "auth_failure",
    "bind_call",
    "cross_tenant",
    "current_call",
    "key_created",
    "key_revoked",
    "permission_denied",
    "unbind_call",
]

log = logging.getLogger("server.audit")

# Bound on every client-chosen string an audit line repeats (a resource name, a subject).
_MAX_FIELD = 200


@dataclass
class CallInfo:
    """The call in progress, as the audit lines name it."""

    method: str
    peer: str
    tenant: str = ""
    subject: str = ""
    via: str = ""
    # Set by cross_tenant(); the interceptor counts it once the call ends.
    cross_tenant_attempts: int = 0


_call: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("framewise_audit_call", default=None)


def bind_call(info: CallInfo) -> contextvars.Token[CallInfo | None]:
    return _call.set(info)


def unbind_call(token: contextvars.Token[CallInfo | None]) -> None:
    _call.reset(token)


def current_call() -> CallInfo | None:
    return _call.get()


def auth_failure(*, method: str, peer: str, via: str, subject: str, reason: str, tenant: str = "") -> None:
    """A call refused UNAUTHENTICATED. ``reason`` (missing, malformed, unknown_key, wrong_secret,
    revoked, expired, invalid_jwt, unmapped_certificate...) is for the operator only: the
    caller is never told why."""
    log.warning(
        "authentication failed",
        extra={"event": "auth_failure", "method": method, "peer": peer, "via": via, "key_id": _clip(subject, _MAX_FIELD),
               "tenant": tenant, "reason": reason},
    )


def permission_denied(*, method: str, peer: str, via: str, subject: str, tenant: str, scope: str) -> None:
    log.warning(
        "permission denied",
        extra={"event": "permission_denied", "method": method, "peer": peer, "via": via,
               "key_id": _clip(subject, _MAX_FIELD), "tenant": tenant, "scope": scope},
    )


def key_created(record: ApiKeyRecord, *, actor: str) -> None:
    log.info(
        "API key created",
        extra={"event": "key_created", "key_id": record.key_id, "tenant": record.tenant, "scopes": list(record.scopes),
               "expires": _iso(record.expire_time), "actor": actor},
    )


def key_revoked(record: ApiKeyRecord, *, actor: str) -> None:
    log.info(
        "API key revoked",
        extra={"event": "key_revoked", "key_id": record.key_id, "tenant": record.tenant,
               "revoked": _iso(record.revoke_time), "actor": actor},
    )


def cross_tenant(*, tenant: str = "", resource: str = "", method: str = "", peer: str = "", subject: str = "") -> None:
    """A caller reached for a resource (an operation, artifact, upload or tracking session) of
    another tenant; it is answered NOT_FOUND like a name that does not exist. Called by the
    servicer that noticed; what it leaves empty is taken from the call in progress."""
    call = _call.get()
    if call is not None:
        call.cross_tenant_attempts += 1
        method = method or call.method
        peer = peer or call.peer
        tenant = tenant or call.tenant
        subject = subject or call.subject
    log.warning(
        "cross-tenant attempt",
        extra={"event": "cross_tenant", "method": method, "peer": peer, "key_id": _clip(subject, _MAX_FIELD),
               "tenant": tenant, "resource": _clip(resource, _MAX_FIELD)},
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()
