"""Who can reach the public gRPC port: the bind policy, as pure functions (no sockets here).

The rule: a server that does not authenticate its callers listens on loopback only, so only
processes on the same machine reach it. Listening on any other address without authentication
is refused at startup unless the operator says so explicitly (--allow-unauthenticated-public):
an unauthenticated inference and job API on a network interface lets anyone list, download and
delete everyone's operations.
"""

from __future__ import annotations

import ipaddress

from server.transport.settings import TransportError

__all__ = [
    "DEFAULT_PORT",
    "PublicListenRefused",
    "check_public_listen",
    "default_listen",
    "is_loopback",
    "security_notice",
]

DEFAULT_PORT = 50051


class PublicListenRefused(TransportError):
    """Listening on a non-loopback address without authentication, and no explicit permission."""


def _host(listen: str) -> str:
    """The host part of a gRPC listen address: "host:port", "[v6]:port", or a bare host."""
    if listen.startswith("["):
        return listen[1 : listen.find("]")] if "]" in listen else listen[1:]
    try:
        ipaddress.ip_address(listen)  # a bare address, IPv6 ones included ("::1")
        return listen
    except ValueError:
        pass
    host, sep, _ = listen.rpartition(":")
    return host if sep else listen


def is_loopback(listen: str) -> bool:
    """True when ``listen`` is reachable only from this machine: a 127.0.0.0/8 or ::1 address,
    "localhost", or a Unix domain socket. Any other name (it may resolve to a public address),
    0.0.0.0, :: or an empty host (every interface) is not."""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = _host(listen).strip().lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, or empty (every interface)
        return False


def default_listen(authenticated: bool, port: int = DEFAULT_PORT) -> str:
    """The listen address when --listen is not given: every interface when callers must
    authenticate (a production server is meant to be reached), loopback otherwise."""
    return f"0.0.0.0:{port}" if authenticated else f"127.0.0.1:{port}"


def check_public_listen(listen: str, auth_required: bool, allowed: bool) -> None:
    """Raises PublicListenRefused when ``listen`` is not loopback, callers need not authenticate
    (``auth_required`` False: neither keys/JWTs nor required client certificates) and the
    operator did not pass --allow-unauthenticated-public (``allowed``)."""
    if auth_required or allowed or is_loopback(listen):
        return
    raise PublicListenRefused(
        f"refusing to listen on {listen} without authentication: any machine that reaches it could call every "
        "RPC and see every operation. Require authentication (--auth required, API keys or a JWT issuer, or "
        "--tls-client-ca for client certificates), listen on loopback (--listen 127.0.0.1:50051), or pass "
        "--allow-unauthenticated-public (FRAMEWISE_ALLOW_UNAUTHENTICATED_PUBLIC=1) if a trusted network or a proxy "
        "in front authenticates callers"
    )


def security_notice(listen: str, *, auth_required: bool, tls: str) -> tuple[bool, str]:
    """(loud, text): the startup line about who can call this server. ``loud`` is True when
    authentication is off (logged as a warning, in capitals, so nobody misses it)."""
    where = "loopback only" if is_loopback(listen) else "reachable from the network"
    if auth_required:
        return False, f"authentication is required on {listen} ({where}); TLS {tls}"
    return True, (
        f"AUTHENTICATION IS OFF: every caller of {listen} ({where}) runs as the default tenant with every scope; "
        f"TLS {tls}"
    )
