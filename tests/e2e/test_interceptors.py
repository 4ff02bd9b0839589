"""The interceptor every RPC passes through, on a real grpc.aio server over a real socket: an
error status reaches the client with its own code however long its message, every string of a
request is bounded, and a draining server refuses new calls while health keeps answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from server.errors import MAX_MESSAGE_BYTES, InvalidInput
from server.interceptors import ObservabilityInterceptor
from server.metrics import Metrics

Request = health_pb2.HealthCheckRequest  # any small message with a string field
Response = health_pb2.HealthCheckResponse
Handler = Callable[[Request, grpc.aio.ServicerContext], Awaitable[Response]]


class Probe:
    """A one-service server for these tests: /test.Probe/Call (unary) and /test.Probe/Upload
    (client stream), with the health service beside them."""

    def __init__(self, call: Handler) -> None:
        self.call = call
        self.interceptor = ObservabilityInterceptor(Metrics(CollectorRegistry()))
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[self.interceptor])
        self.received: list[str] = []

    async def upload(self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext) -> Response:
        async for request in requests:
            self.received.append(request.service)
        return Response(status=Response.SERVING)

    async def __aenter__(self) -> grpc.aio.Channel:
        handlers = {
            "Call": grpc.unary_unary_rpc_method_handler(self.call, Request.FromString, Response.SerializeToString),
            "Upload": grpc.stream_unary_rpc_method_handler(self.upload, Request.FromString, Response.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Probe", handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        return self.channel

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(0)


def _call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary("/test.Probe/Call", Request.SerializeToString, Response.FromString)


async def _ok(request: Request, context: grpc.aio.ServicerContext) -> Response:
    return Response(status=Response.SERVING)


@pytest.mark.parametrize("text", ["x" * 20_000, "\u00fc\u4e2d" * 10_000], ids=["ascii", "non-ascii"])
async def test_a_huge_error_message_reaches_the_client_bounded_with_its_own_code(text: str) -> None:
    """Quoted into grpc-message (percent-encoded) and grpc-status-details-bin (the message
    again, and the violation), a 20,000-character message made trailers over the client's
    16 KiB metadata limit: the client saw RESOURCE_EXHAUSTED "Stream removed"."""

    async def fail(request: Request, context: grpc.aio.ServicerContext) -> Response:
        raise InvalidInput(f"class name {text} is unknown", "class_names")

    async with Probe(fail) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _call(channel)(Request(service="ok"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("class name ") and len(error.value.details().encode()) <= MAX_MESSAGE_BYTES
    status = rpc_status.from_call(error.value)
    assert status is not None and status.message == error.value.details()
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request) and bad_request.field_violations[0].field == "class_names"


async def test_a_string_over_its_limit_is_invalid_argument_naming_the_field() -> None:
    async with Probe(_ok) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _call(channel)(Request(service="s" * 5000), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "service is 5000 characters long; at most 256" in error.value.details()
        status = rpc_status.from_call(error.value)
        bad_request = error_details_pb2.BadRequest()
        assert status is not None and status.details[0].Unpack(bad_request)
        assert [v.field for v in bad_request.field_violations] == ["service"]
        # The server goes on answering.
        assert (await _call(channel)(Request(service="s" * 256), timeout=10)).status == Response.SERVING


async def test_each_message_of_a_client_stream_is_bounded_as_it_arrives() -> None:
    probe = Probe(_ok)
    async with probe as channel:
        upload = channel.stream_unary("/test.Probe/Upload", Request.SerializeToString, Response.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await upload(iter([Request(service="a"), Request(service="b"), Request(service="c" * 300)]), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "service" in error.value.details()
    assert probe.received == ["a", "b"]  # the servicer never saw the long one


# Field 1 (a string) declared 2^35 bytes long: no HealthCheckRequest parses from this.
NOT_A_MESSAGE = b"\x0a\xff\xff\xff\xff\x0f garbage"


async def test_bytes_that_are_no_message_are_invalid_argument_not_unknown() -> None:
    """gRPC deserializes a request outside every handler: a DecodeError there reached the
    client as UNKNOWN "Unexpected <class 'DecodeError'>" before any handler ran."""
    probe = Probe(_ok)
    async with probe as channel:
        raw = channel.unary_unary("/test.Probe/Call", None, Response.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await raw(NOT_A_MESSAGE, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert "not a valid grpc.health.v1.HealthCheckRequest message" in error.value.details()
        upload = channel.stream_unary("/test.Probe/Upload", None, Response.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await upload(iter([Request(service="a").SerializeToString(), NOT_A_MESSAGE]), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert probe.received == ["a"]
        assert (await _call(channel)(Request(service="ok"), timeout=10)).status == Response.SERVING


async def test_a_draining_server_refuses_new_calls_while_health_answers_not_serving() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(request: Request, context: grpc.aio.ServicerContext) -> Response:
        started.set()
        await release.wait()
        return Response(status=Response.SERVING)

    probe = Probe(slow)
    async with probe as channel:
        in_flight = asyncio.ensure_future(_call(channel)(Request(service="first"), timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        await probe.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        drained = asyncio.create_task(probe.interceptor.drain(30))
        await asyncio.sleep(0.1)

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call(channel)(Request(service="second"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == Response.NOT_SERVING
        assert not drained.done()  # the call in flight holds the drain

        release.set()
        assert (await in_flight).status == Response.SERVING
        assert await asyncio.wait_for(drained, 10) is True


async def test_a_drain_gives_up_after_its_grace_period() -> None:
    started = asyncio.Event()

    async def stuck(request: Request, context: grpc.aio.ServicerContext) -> Response:
        started.set()
        await asyncio.sleep(60)
        return Response()

    probe = Probe(stuck)
    async with probe as channel:
        call = _call(channel)(Request(), timeout=30)
        await asyncio.wait_for(started.wait(), 10)
        assert await probe.interceptor.drain(0.2) is False
        call.cancel()
