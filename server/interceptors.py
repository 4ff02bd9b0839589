"""One place for what every RPC needs: metrics, error mapping (AIP-193) and access logs.

Servicers raise server.errors.ServiceError subclasses; this interceptor turns them into a
gRPC status with google.rpc details. Anything else is logged with its traceback and answered
INTERNAL with an incident id, never with the traceback itself.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_status import rpc_status

from server.errors import ServiceError
from server.metrics import Metrics

log = logging.getLogger("server.rpc")


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=_accept_bytes(handler.response_serializer),
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=_accept_bytes(handler.response_serializer),
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=_accept_bytes(handler.response_serializer),
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=_accept_bytes(handler.response_serializer),
        )

    def _wrap_unary(self, method: str, behavior):  # noqa: ANN001, ANN202 - grpc handler types
        async def wrapped(request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN202
            started, peer = self._begin(method, context)
            try:
                return await behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                await self._abort(method, exc, context)
            finally:
                self._end(method, started, peer, context)

        return wrapped

    def _wrap_stream(self, method: str, behavior):  # noqa: ANN001, ANN202
        async def wrapped(request, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:  # noqa: ANN001
            started, peer = self._begin(method, context)
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    # aclosing: if this stream is closed early, the handler's own cleanup (a
                    # tracking session's detach) runs now, not when it is garbage-collected.
                    async with contextlib.aclosing(result):
                        async for message in result:
                            yield message
                else:
                    await result
            except Exception as exc:  # noqa: BLE001
                await self._abort(method, exc, context)
            finally:
                self._end(method, started, peer, context)

        return wrapped

    def _begin(self, method: str, context: grpc.aio.ServicerContext) -> tuple[float, str]:
        self.metrics.rpc_in_flight.labels(method).inc()
        # The peer is read now, while the call is alive: context.peer() reaches into the C core,
        # and on a call the client has just cancelled it dereferenced a freed call and
        # segfaulted the server (grpcio 1.85, WatchOperation cancelled as it ended).
        return time.perf_counter(), context.peer()

    def _end(self, method: str, started: float, peer: str, context: grpc.aio.ServicerContext) -> None:
        elapsed = time.perf_counter() - started
        code = _code_name(context)
        self.metrics.rpc_in_flight.labels(method).dec()
        self.metrics.rpc_latency.labels(method, code).observe(elapsed)
        if code != "OK":
            self.metrics.rpc_errors.labels(method, code).inc()
            log.warning(
                "rpc failed",
                extra={"method": method, "code": code, "details": context.details(), "duration_ms": round(elapsed * 1e3, 2), "peer": peer},
            )
        else:
            log.debug("rpc ok", extra={"method": method, "duration_ms": round(elapsed * 1e3, 2), "peer": peer})

    async def _abort(self, method: str, exc: Exception, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # already a status
        if isinstance(exc, ServiceError):
            await context.abort_with_status(rpc_status.to_status(exc.to_status()))
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error", extra={"method": method, "incident": incident})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server logs hold the details")


def _accept_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that also passes pre-serialized bytes through, so a stream fanning
    one event out to many watchers serializes it once, not once per watcher."""
    if serializer is None:
        return None
    return lambda message: message if isinstance(message, bytes) else serializer(message)


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    # grpc.aio may report the raw integer code.
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.name
    return str(code)
