"""Wrapping a gRPC method handler's behaviour, for the server's interceptors (observability,
authentication, quotas): the one place that knows the four handler kinds and how a wrapped
response stream hands its close on to the servicer's generator."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

# A handler's behaviour: (request or request iterator, context) -> a response, or an async
# iterator of responses.
Behavior = Callable[..., Any]
# Wraps one behaviour; the flag says whether the requests arrive as a stream.
Wrapper = Callable[[Behavior, bool], Behavior]

__all__ = ["Behavior", "Wrapper", "responses", "wrap_handler"]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Wrapper,
    stream: Wrapper,
    *,
    deserializer: Callable[[Any], Any] = lambda deserializer: deserializer,
    serializer: Callable[[Any], Any] = lambda serializer: serializer,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: by ``unary`` when the method answers with one
    message, by ``stream`` when it streams its answers. ``deserializer`` and ``serializer`` may
    replace the request deserializer and the response serializer (each gets the handler's own)."""
    kwargs = {
        "request_deserializer": deserializer(handler.request_deserializer),
        "response_serializer": serializer(handler.response_serializer),
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream, False), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream, True), **kwargs)


@contextlib.asynccontextmanager
async def responses(result: object) -> AsyncIterator[AsyncIterator[object]]:
    """The messages of a response-streaming behaviour's ``result``, for a wrapper to yield on.
    When the block exits (the stream ended, failed, or was closed early by its client) the
    servicer's generator is closed at once, so its own cleanup (a tracking session's detach)
    runs now, not when the generator is garbage-collected. A behaviour that writes with
    ``context.write`` and returns a coroutine is awaited and yields nothing here."""
    if inspect.isasyncgen(result):
        async with contextlib.aclosing(result):
            yield result
    else:
        await result  # type: ignore[misc]
        yield _nothing()


async def _nothing() -> AsyncIterator[object]:
    return
    yield  # an async generator that yields nothing
