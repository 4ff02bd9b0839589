"""The one place a client channel is built: plaintext or TLS (with a client certificate for
mutual TLS), and the API key sent as ``authorization: Bearer <key>`` metadata on every call.

    channel = open_channel("api.example.com:50051", Connection(api_key=key, tls=True))
    channel = open_channel("localhost:50051", Connection.from_env())   # FRAMEWISE_API_KEY, FRAMEWISE_TLS, ...

FramewiseClient (clients/sdk.py) and every CLI command build their channel here, so a new
credential or option reaches all of them at once.

Why the key travels through a client interceptor and not grpc call credentials: gRPC refuses
call credentials on a plaintext channel, and a server on loopback (``make serve``) is plaintext.
The interceptor adds the same header to every kind of call (unary, server streaming, the Track
bidirectional stream, uploads). Sending a key in plaintext to another machine exposes it to
anyone on the path, so that combination is warned about (UserWarning).
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["AUTHORIZATION_METADATA", "Connection", "open_channel"]

AUTHORIZATION_METADATA = "authorization"


@dataclass(frozen=True)
class Connection:
    """How to reach the server: credentials and transport security. The default is what
    ``make serve`` needs: plaintext on loopback, no key."""

    # Sent as "authorization: Bearer <api_key>" on every call (an API key or a JWT).
    api_key: str | None = None
    # TLS to the server; implied by ca_cert, client_cert and client_key.
    tls: bool = False
    # PEM CA bundle that signed the server's certificate; None: the system's trust store.
    ca_cert: Path | None = None
    # PEM client certificate and key, for a server that requires client certificates (mTLS).
    client_cert: Path | None = None
    client_key: Path | None = None
    # The name to check the server's certificate against instead of the address's host (an
    # address by IP, or through a tunnel).
    server_name: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(p is not None for p in (self.ca_cert, self.client_cert, self.client_key))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Connection:
        """FRAMEWISE_API_KEY, FRAMEWISE_TLS (1/true), FRAMEWISE_CA_CERT, FRAMEWISE_CLIENT_CERT,
        FRAMEWISE_CLIENT_KEY, FRAMEWISE_TLS_SERVER_NAME."""
        env = os.environ if environ is None else environ

        def path(name: str) -> Path | None:
            value = env.get(name, "")
            return Path(value) if value else None

        return cls(
            api_key=env.get("FRAMEWISE_API_KEY") or None,
            tls=env.get("FRAMEWISE_TLS", "").lower() in ("1", "true", "yes"),
            ca_cert=path("FRAMEWISE_CA_CERT"),
            client_cert=path("FRAMEWISE_CLIENT_CERT"),
            client_key=path("FRAMEWISE_CLIENT_KEY"),
            server_name=env.get("FRAMEWISE_TLS_SERVER_NAME") or None,
        )


def open_channel(
    address: str, connection: Connection = Connection(), *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``address`` as ``connection`` says. ValueError for an unusable
    setting (a client certificate without its key, a key with spaces, an unreadable file)."""
    if (connection.client_cert is None) != (connection.client_key is None):
        raise ValueError("--client-cert and --client-key go together (the certificate and its private key)")
    interceptors: list[grpc.aio.ClientInterceptor] = []
    if connection.api_key:
        interceptors.extend(_bearer_interceptors(_bearer(connection.api_key)))
    channel_options = list(options)
    if not connection.uses_tls:
        if connection.api_key and not _is_loopback(address):
            warnings.warn(
                f"sending an API key to {address} without TLS: anyone on the network path can read it (use --tls)",
                UserWarning,
                stacklevel=2,
            )
        return grpc.aio.insecure_channel(address, options=channel_options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(connection.ca_cert, "--ca-cert"),
        private_key=_read(connection.client_key, "--client-key"),
        certificate_chain=_read(connection.client_cert, "--client-cert"),
    )
    if connection.server_name:
        channel_options.append(("grpc.ssl_target_name_override", connection.server_name))
    return grpc.aio.secure_channel(address, credentials, options=channel_options, interceptors=interceptors)


def _bearer(key: str) -> str:
    key = key.strip()
    if key.lower().startswith("bearer "):  # a pasted header value: keep the token alone
        key = key[7:].strip()
    if not key or any(c.isspace() or not c.isprintable() or ord(c) > 126 for c in key):
        raise ValueError("the API key must be one printable ASCII word (check FRAMEWISE_API_KEY / --api-key)")
    return f"Bearer {key}"


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def _is_loopback(address: str) -> bool:
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    else:
        host = host.rpartition(":")[0] or host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _with_header(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# One interceptor object per call kind: grpc.aio files an interceptor under the FIRST kind it is
# an instance of (an if/elif chain), so a single class implementing all four would only ever see
# unary calls, and the streams (Track, uploads, watches) would go out without the key.
class _UnaryUnaryBearer(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_unary(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_header(client_call_details, self._header), request)


class _UnaryStreamBearer(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_stream(
        self, continuation: Callable[..., Awaitable[Any]], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_header(client_call_details, self._header), request)


class _StreamUnaryBearer(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | None,
    ) -> Any:
        return await continuation(_with_header(client_call_details, self._header), request_iterator)


class _StreamStreamBearer(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: AsyncIterable[Any] | None,
    ) -> Any:
        return await continuation(_with_header(client_call_details, self._header), request_iterator)


def _bearer_interceptors(value: str) -> list[grpc.aio.ClientInterceptor]:
    """Adds ``authorization: Bearer <key>`` to every call's metadata, whatever its kind."""
    header = (AUTHORIZATION_METADATA, value)
    return [_UnaryUnaryBearer(header), _UnaryStreamBearer(header), _StreamUnaryBearer(header), _StreamStreamBearer(header)]
