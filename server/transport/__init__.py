"""The public gRPC port's transport: TLS and mutual TLS, the address it listens on, and the rule
that an unauthenticated server stays on loopback.

    settings.py   TlsSettings / TransportSettings (what the --tls-* flags and
                  --allow-unauthenticated-public say), validated
    tls.py        grpc.ServerCredentials from TlsSettings; add_listen_port (secure or not)
    posture.py    the posture a replica starts with (listen address resolved and checked,
                  authentication on/off, TLS): the startup log line and GetServerInfo.security
    exposure.py   the pure bind policy: is an address loopback, the default listen address,
                  refusing a public listener without authentication, the startup notice
    identity.py   a verified client certificate's identity (subject CN, SANs) read from a
                  call's grpc auth context: what the authentication layer maps to a tenant

Nothing here decides who a caller is (server/auth/ does); this package only makes sure the bytes
travel encrypted when configured, that a client certificate was verified against the configured
CA before its identity is believed, and that a server without authentication cannot be reached
from another machine by accident.
"""

from server.transport.exposure import (
    DEFAULT_PORT,
    PublicListenRefused,
    check_public_listen,
    default_listen,
    is_loopback,
    security_notice,
)
from server.transport.posture import SecurityPosture, log_posture, resolve_posture
from server.transport.identity import ClientIdentity, client_identity, client_identity_of
from server.transport.settings import CLIENT_AUTH_MODES, TlsSettings, TransportError, TransportSettings, tls_settings
from server.transport.tls import add_listen_port, server_credentials

__all__ = [
    "CLIENT_AUTH_MODES",
    "DEFAULT_PORT",
    "ClientIdentity",
    "PublicListenRefused",
    "SecurityPosture",
    "TlsSettings",
    "TransportError",
    "TransportSettings",
    "add_listen_port",
    "check_public_listen",
    "client_identity",
    "client_identity_of",
    "default_listen",
    "is_loopback",
    "log_posture",
    "resolve_posture",
    "security_notice",
    "server_credentials",
    "tls_settings",
]
