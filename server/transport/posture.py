"""The security posture a replica starts with: the address it listens on (chosen and checked by
exposure.py), whether callers must authenticate, TLS; what the startup log and GetServerInfo say
about it. Built once by the composition root (server/app.py) before anything is started, so a
refused public listener stops the start before Triton or the job store are touched."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from framewise.v1 import info_service_pb2
from server.transport.exposure import check_public_listen, default_listen, is_loopback, security_notice
from server.transport.settings import TlsSettings, TransportSettings

__all__ = ["SecurityPosture", "log_posture", "resolve_posture"]


@dataclass(frozen=True)
class SecurityPosture:
    listen: str
    # Callers must authenticate: the authentication layer requires credentials, or every TLS
    # connection must present a verified client certificate.
    auth_required: bool
    # --auth as configured ("off", "auto", "required"; "" when the server has no such setting).
    auth_mode: str
    tls: TlsSettings

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.listen)

    def info(self) -> info_service_pb2.SecurityInfo:
        """GetServerInfoResponse.security."""
        return info_service_pb2.SecurityInfo(
            authentication_required=self.auth_required,
            auth_mode=self.auth_mode,
            tls=self.tls.enabled,
            client_certificates_required=self.tls.client_auth_required,
            listen=self.listen,
            loopback_only=self.loopback_only,
        )


def resolve_posture(
    listen: str, transport: TransportSettings, *, auth_required: bool, auth_mode: str = ""
) -> SecurityPosture:
    """The posture for ``listen`` (--listen; "" picks default_listen). ``auth_required``: what
    the authentication layer decided (--auth, keys in the store, a JWT issuer). Required client
    certificates count as authentication too: nobody without a certificate from the client CA
    completes a handshake. Raises PublicListenRefused (exposure.py) for a non-loopback address
    without authentication unless --allow-unauthenticated-public."""
    authenticated = auth_required or transport.tls.client_auth_required
    resolved = listen or default_listen(authenticated)
    check_public_listen(resolved, authenticated, transport.allow_unauthenticated_public)
    return SecurityPosture(listen=resolved, auth_required=authenticated, auth_mode=auth_mode, tls=transport.tls)


def log_posture(log: logging.Logger, posture: SecurityPosture) -> None:
    """One startup line about who can call this server: a WARNING in capitals when
    authentication is off, so it stands out in any log viewer."""
    loud, text = security_notice(posture.listen, auth_required=posture.auth_required, tls=posture.tls.describe())
    extra = {
        "listen": posture.listen,
        "authentication_required": posture.auth_required,
        "auth_mode": posture.auth_mode,
        "tls": posture.tls.describe(),
        "loopback_only": posture.loopback_only,
    }
    if loud:
        log.warning(text, extra=extra)
    else:
        log.info(text, extra=extra)
