"""Which RPC family each method's calls are counted against: the authorization scope the
method needs (server/auth/scopes.py's one table, so the two can never disagree). Methods that
need no scope (health, reflection, server info) are not rate-limited: a load balancer's probes
must never be refused for quota. A method missing from the table counts as ``admin``, as
authorization treats it (fail closed)."""

from __future__ import annotations

from server.auth.scopes import required_scope

__all__ = ["family_of"]


def family_of(method: str) -> str | None:
    """The family of a full method name (``/package.Service/Method``), or None."""
    return required_scope(method)
