"""What the transport flags say, checked once at startup (a bad combination is a usage error,
never a server that silently runs without the protection asked for)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# --tls-client-auth values. "none": no client certificate is asked for. "require": every client
# must present a certificate signed by --tls-client-ca, or the TLS handshake fails.
#
# Why there is no "optional": grpcio's Python server API (grpc.ssl_server_credentials and
# dynamic_ssl_server_credentials) only offers "do not request a client certificate" or "request,
# require and verify one" (its require_client_auth is a bool). With require_client_auth=False a
# client's certificate is never even requested, so an "optional" mode would silently identify
# nobody. A deployment that mixes certificate clients and key clients runs with "require" for
# the certificate clients behind one listener, or authenticates everyone with keys/JWTs.
CLIENT_AUTH_MODES: tuple[str, ...] = ("none", "require")


class TransportError(ValueError):
    """The transport cannot start as configured (a refused public listener, an unreadable
    certificate): the server stops with this message instead of serving differently."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS on the public gRPC port. No cert: plaintext (only sensible on loopback or behind a
    TLS-terminating load balancer)."""

    cert: Path | None = None
    key: Path | None = None
    # CA bundle that signs client certificates (mutual TLS); None: no client certificates.
    client_ca: Path | None = None
    client_auth: str = "none"

    @property
    def enabled(self) -> bool:
        return self.cert is not None

    @property
    def client_auth_required(self) -> bool:
        """Every connection carries a client certificate verified against ``client_ca``."""
        return self.client_auth == "require"

    def describe(self) -> str:
        """"off", "on", "on, client certificates required": for logs and `framewise info`."""
        if not self.enabled:
            return "off"
        return "on, client certificates required" if self.client_auth_required else "on"


@dataclass(frozen=True)
class TransportSettings:
    tls: TlsSettings = TlsSettings()
    # --allow-unauthenticated-public: listen on a non-loopback address although no caller has
    # to authenticate (a trusted private network, or a proxy in front that authenticates).
    allow_unauthenticated_public: bool = False


def tls_settings(cert: Path | None, key: Path | None, client_ca: Path | None, client_auth: str | None) -> TlsSettings:
    """TlsSettings from the flags; ValueError naming the flag for an impossible combination.
    ``client_auth`` None: "require" when a client CA is given, else "none"."""
    if (cert is None) != (key is None):
        raise ValueError("--tls-cert and --tls-key go together (the server's certificate chain and its private key)")
    if client_auth is None:
        client_auth = "require" if client_ca is not None else "none"
    if client_auth == "optional":
        raise ValueError(
            "--tls-client-auth optional is not supported: grpcio's server API either never requests a client "
            "certificate or requires a verified one, so 'optional' would identify nobody; use 'require', or "
            "authenticate clients without certificates with API keys or JWTs"
        )
    if client_auth not in CLIENT_AUTH_MODES:
        raise ValueError(f"--tls-client-auth must be one of {', '.join(CLIENT_AUTH_MODES)}, got {client_auth!r}")
    if client_ca is not None and cert is None:
        raise ValueError("--tls-client-ca needs TLS on the port: give --tls-cert and --tls-key too")
    if client_auth == "require" and client_ca is None:
        raise ValueError("--tls-client-auth require needs --tls-client-ca (the CA that signs client certificates)")
    if client_auth == "none" and client_ca is not None:
        raise ValueError("--tls-client-ca with --tls-client-auth none would configure a CA that is never used")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag}: no such file: {path}")
    return TlsSettings(cert=cert, key=key, client_ca=client_ca, client_auth=client_auth)
