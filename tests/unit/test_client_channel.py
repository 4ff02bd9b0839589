"""The SDK's one channel helper (clients/channel.py): the API key reaches the server as
"authorization: Bearer <key>" on every kind of call, over plaintext and over TLS; bad settings
are refused before anything is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from clients.channel import Connection, open_channel
from clients.sdk import FramewiseClient
from tests.tls_certs import Pki, make_pki
from server.transport import TlsSettings, add_listen_port

_IDENTITY = (lambda b: b, lambda b: b)  # raw bytes in and out


class _MetadataRecorder(grpc.GenericRpcHandler):
    """Answers /t.T/{Unary,ServerStream,ClientStream,BidiStream} with b"ok" and records each call's
    authorization header."""

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}

    def _record(self, name: str, context: grpc.aio.ServicerContext) -> None:
        self.seen[name] = [v for k, v in context.invocation_metadata() if k == "authorization"]

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        name = details.method.rpartition("/")[2]

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self._record(name, context)
            return b"ok"

        async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            self._record(name, context)
            yield b"ok"

        async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            self._record(name, context)
            async for _ in requests:
                pass
            return b"ok"

        async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            self._record(name, context)
            async for _ in requests:
                yield b"ok"

        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, *_IDENTITY),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, *_IDENTITY),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, *_IDENTITY),
            "BidiStream": grpc.stream_stream_rpc_method_handler(bidi, *_IDENTITY),
        }
        return handlers.get(name)


async def _every_kind_of_call(channel: grpc.aio.Channel) -> None:
    assert await channel.unary_unary("/t.T/Unary")(b"x", timeout=5) == b"ok"
    assert [r async for r in channel.unary_stream("/t.T/ServerStream")(b"x", timeout=5)] == [b"ok"]

    async def two() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    assert await channel.stream_unary("/t.T/ClientStream")(two(), timeout=5) == b"ok"
    # Written explicitly, as FramewiseClient.track writes its frames (no request iterator).
    call = channel.stream_stream("/t.T/BidiStream")(timeout=5)
    await call.write(b"frame")
    assert await call.read() == b"ok"
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_api_key_is_sent_on_every_kind_of_call(tls: bool, pki: Pki) -> None:
    recorder = _MetadataRecorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recorder,))
    settings = TlsSettings(cert=pki.server.cert, key=pki.server.key) if tls else TlsSettings()
    port = add_listen_port(server, "127.0.0.1:0", settings)
    await server.start()
    try:
        connection = Connection(api_key="fw_test_key_123", ca_cert=pki.ca if tls else None)
        async with open_channel(f"localhost:{port}", connection) as channel:
            await _every_kind_of_call(channel)
        assert recorder.seen == {name: ["Bearer fw_test_key_123"] for name in ("Unary", "ServerStream", "ClientStream", "BidiStream")}
        # Without a key, nothing is added.
        async with open_channel(f"localhost:{port}", Connection(ca_cert=pki.ca if tls else None)) as channel:
            await _every_kind_of_call(channel)
        assert all(values == [] for values in recorder.seen.values())
    finally:
        await server.stop(0)


async def test_the_sdk_client_uses_the_helper(pki: Pki) -> None:
    recorder = _MetadataRecorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((recorder,))
    port = add_listen_port(server, "127.0.0.1:0", TlsSettings())
    await server.start()
    try:
        async with FramewiseClient(f"127.0.0.1:{port}", connection=Connection(api_key="Bearer k1")) as client:
            # The raw channel: every stub of the client sits on it.
            assert await client._channel.unary_unary("/t.T/Unary")(b"x", timeout=5) == b"ok"
        assert recorder.seen["Unary"] == ["Bearer k1"]  # a pasted "Bearer ..." is not doubled
    finally:
        await server.stop(0)


def test_bad_settings_are_refused_before_connecting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--client-cert and --client-key go together"):
        open_channel("localhost:1", Connection(client_cert=tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="one printable ASCII word"):
        open_channel("localhost:1", Connection(api_key="two words"))
    with pytest.raises(ValueError, match="--ca-cert: cannot read"):
        open_channel("localhost:1", Connection(ca_cert=tmp_path / "missing.pem"))


async def test_a_key_in_plaintext_to_another_machine_is_warned_about() -> None:
    # In a running loop: a grpc.aio channel made outside one fails when no default loop is left.
    with pytest.warns(UserWarning, match="without TLS"):
        channel = open_channel("10.1.2.3:50051", Connection(api_key="k"))
    await channel.close()


def test_connection_from_environment(tmp_path: Path) -> None:
    env = {"FRAMEWISE_API_KEY": "k", "FRAMEWISE_CA_CERT": str(tmp_path / "ca.pem"), "FRAMEWISE_CLIENT_CERT": "",
           "FRAMEWISE_TLS": "1", "FRAMEWISE_TLS_SERVER_NAME": "api.example.com"}  # fmt: skip
    connection = Connection.from_env(env)
    assert connection == Connection(api_key="k", tls=True, ca_cert=tmp_path / "ca.pem", server_name="api.example.com")
    assert Connection.from_env({}) == Connection() and not Connection().uses_tls
    assert Connection(client_cert=tmp_path / "c", client_key=tmp_path / "k").uses_tls
