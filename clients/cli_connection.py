"""The CLI's connection options, shared by every command: where the server is, the API key, TLS.

    --server HOST:PORT          FRAMEWISE_SERVER (default localhost:50051)
    --api-key KEY               FRAMEWISE_API_KEY: sent as "authorization: Bearer KEY"
    --tls                       FRAMEWISE_TLS=1: TLS, trusting the system's CAs
    --ca-cert PEM               FRAMEWISE_CA_CERT: the CA that signed the server's certificate (implies --tls)
    --client-cert PEM --client-key PEM
                                FRAMEWISE_CLIENT_CERT / FRAMEWISE_CLIENT_KEY: mutual TLS (implies --tls)
    --tls-server-name NAME      FRAMEWISE_TLS_SERVER_NAME: check the certificate against NAME

Prefer the environment for the key: a command line is visible to every user of the machine
(``ps``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.channel import Connection
from clients.sdk import DEFAULT_ADDRESS, FramewiseClient

__all__ = ["add_connection_options", "client_for", "connection_from_args", "describe_refusal"]


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    env = Connection.from_env()
    parser.add_argument(
        "--server",
        default=os.environ.get("FRAMEWISE_SERVER", DEFAULT_ADDRESS),
        help=f"host:port of the service (env FRAMEWISE_SERVER, default {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--api-key", default=env.api_key, help="API key sent as 'authorization: Bearer KEY' (prefer env FRAMEWISE_API_KEY)")
    parser.add_argument("--tls", action="store_true", default=env.tls, help="connect with TLS (env FRAMEWISE_TLS=1)")
    parser.add_argument("--ca-cert", type=Path, default=env.ca_cert, metavar="PEM",
                        help="CA certificate(s) that signed the server's certificate; implies --tls (env FRAMEWISE_CA_CERT)")
    parser.add_argument("--client-cert", type=Path, default=env.client_cert, metavar="PEM",
                        help="client certificate for mutual TLS; implies --tls (env FRAMEWISE_CLIENT_CERT)")
    parser.add_argument("--client-key", type=Path, default=env.client_key, metavar="PEM",
                        help="private key of --client-cert (env FRAMEWISE_CLIENT_KEY)")
    parser.add_argument("--tls-server-name", default=env.server_name, metavar="NAME",
                        help="name the server's certificate must carry, when it differs from the --server host "
                             "(env FRAMEWISE_TLS_SERVER_NAME)")


def connection_from_args(args: argparse.Namespace) -> Connection:
    return Connection(
        api_key=args.api_key or None,
        tls=bool(args.tls),
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
        server_name=args.tls_server_name or None,
    )


def client_for(args: argparse.Namespace) -> FramewiseClient:
    """The client every command uses: --server, --timeout and the connection options."""
    return FramewiseClient(args.server, timeout_s=args.timeout, connection=connection_from_args(args))


def describe_refusal(exc: grpc.aio.AioRpcError, address: str) -> str:
    """What a refused call prints: "error: CODE_NAME: details", then what to do about it."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in (exc.details() or "").lower():
        return (
            f"error: UNAVAILABLE: cannot reach the Framewise service at {address} ({exc.details()}); start it with "
            "`make serve` or pass --server (a TLS server needs --tls or --ca-cert; one that requires client "
            "certificates, --client-cert and --client-key)"
        )
    lines = [f"error: {code.name}: {exc.details()}"]
    if code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append("  the server requires a credential: pass --api-key or set FRAMEWISE_API_KEY")
    status = rpc_status.from_call(exc)
    for detail in status.details if status else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            lines += [f"  field {v.field}: {v.description}" for v in bad_request.field_violations]
    return "\n".join(lines)
