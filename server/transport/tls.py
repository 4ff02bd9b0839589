"""Server credentials for the public gRPC port, and the one call that opens it."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from server.transport.settings import TlsSettings, TransportError

__all__ = ["add_listen_port", "server_credentials"]


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """grpc.ssl_server_credentials from the PEM files named by ``tls`` (read now: a certificate
    rotated on disk takes effect at the next start). TransportError for unreadable or non-PEM files
    and for a key that is not the certificate's."""
    if not tls.enabled or tls.key is None or tls.cert is None:
        raise TransportError("TLS is not configured (--tls-cert and --tls-key)")
    chain = _read_pem(tls.cert, "--tls-cert", b"CERTIFICATE")
    key = _read_pem(tls.key, "--tls-key", b"PRIVATE KEY")
    client_ca = _read_pem(tls.client_ca, "--tls-client-ca", b"CERTIFICATE") if tls.client_ca is not None else None
    _check_with_openssl(tls)
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=client_ca,
        # True: the handshake fails without a client certificate signed by client_ca. (False
        # with a CA would not even ask for one; settings.py refuses that combination.)
        require_client_auth=tls.client_auth_required,
    )


def add_listen_port(server: grpc.aio.Server, listen: str, tls: TlsSettings) -> int:
    """Open ``listen`` on ``server``, with TLS when configured; returns the port (``:0`` picks
    one). TransportError for bad TLS files (server_credentials); OSError when the address
    cannot be bound (in use or invalid)."""
    credentials = server_credentials(tls) if tls.enabled else None
    try:
        # grpcio reports a failed bind as port 0 or as RuntimeError("Failed to bind ..."),
        # depending on the version; both mean the same here.
        port = server.add_insecure_port(listen) if credentials is None else server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen} (address in use or invalid): {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen} (address in use or invalid)")
    return port


def _check_with_openssl(tls: TlsSettings) -> None:
    """Loads the files once with the standard library's OpenSSL, which says what is wrong (a key
    that does not belong to the certificate, a damaged PEM); gRPC only reports "Failed to bind"
    when the port opens, after the rest of the server was built."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TransportError(f"--tls-key {tls.key} is not the private key of --tls-cert {tls.cert}") from None
        raise TransportError(f"--tls-cert / --tls-key: OpenSSL cannot load them: {exc}") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=str(tls.client_ca))
        except ssl.SSLError as exc:
            raise TransportError(f"--tls-client-ca {tls.client_ca}: OpenSSL cannot load it: {exc}") from None


def _read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TransportError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise TransportError(f"{flag}: {path} is not a PEM file holding a {marker.decode().lower()}")
    return data
