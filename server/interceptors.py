"""One place for what every RPC needs: metrics, error mapping (AIP-193), access logs, the
bounds on a request's strings, and refusing new calls while the server drains.

Servicers raise server.errors.ServiceError subclasses; this interceptor turns them into a
gRPC status with google.rpc details. Anything else is logged with its traceback and answered
INTERNAL with an incident id, never with the traceback itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from server.errors import InvalidInput, ServiceError, Unavailable
from server.jobs.store.protocol import JobStoreUnavailableError
from server.metrics import Metrics
from server.request_limits import check_string_lengths
from server.rpc_handlers import responses, wrap_handler

log = logging.getLogger("server.rpc")

# Services that keep answering while the server drains: health says NOT_SERVING (so a load
# balancer moves on), reflection lets a client still read the API.
DRAIN_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._draining = False
        # Calls in progress, the drain-exempt ones (health watches) left out: what a drain waits for.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """From now on refuse new calls (UNAVAILABLE) except health and reflection, which keep
        answering; wait up to ``timeout_s`` for the calls in progress to end. True when they did."""
        self._draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout_s, 0.0)):
                await self._idle.wait()
        return self._in_flight == 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        exempt = method.startswith(DRAIN_EXEMPT_PREFIXES)
        return wrap_handler(
            handler,
            lambda behavior, streaming: self._wrap_unary(method, behavior, exempt, streaming_requests=streaming),
            lambda behavior, streaming: self._wrap_stream(method, behavior, exempt, streaming_requests=streaming),
            deserializer=_tolerant,
            serializer=_accept_bytes,
        )

    def _wrap_unary(self, method: str, behavior, exempt: bool, *, streaming_requests: bool):  # noqa: ANN001, ANN202 - grpc handler types
        async def wrapped(request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN202
            started, peer = self._begin(method, context, exempt)
            try:
                return await behavior(self._admit(request, exempt, streaming_requests), context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                await self._abort(method, exc, context)
            finally:
                self._end(method, started, peer, context, exempt)

        return wrapped

    def _wrap_stream(self, method: str, behavior, exempt: bool, *, streaming_requests: bool):  # noqa: ANN001, ANN202
        async def wrapped(request, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:  # noqa: ANN001
            started, peer = self._begin(method, context, exempt)
            try:
                async with responses(behavior(self._admit(request, exempt, streaming_requests), context)) as messages:
                    async for message in messages:
                        yield message
            except Exception as exc:  # noqa: BLE001
                await self._abort(method, exc, context)
            finally:
                self._end(method, started, peer, context, exempt)

        return wrapped

    def _admit(self, request, exempt: bool, streaming_requests: bool):  # noqa: ANN001, ANN202 - a message or an iterator of them
        """The request as the servicer gets it: refused while draining, its strings bounded (each
        message of a client stream as it arrives)."""
        if self._draining and not exempt:
            raise Unavailable("the server is shutting down; retry on another replica or after its restart", retry_after_s=5.0)
        if streaming_requests:
            return _bounded_stream(request)
        if isinstance(request, Undecodable):
            raise request.error()
        if isinstance(request, Message):
            check_string_lengths(request)
        return request

    def _begin(self, method: str, context: grpc.aio.ServicerContext, exempt: bool) -> tuple[float, str]:
        if not exempt:
            self._in_flight += 1
            self._idle.clear()
        self.metrics.rpc_in_flight.labels(method).inc()
        # The peer is read now, while the call is alive: context.peer() reaches into the C core,
        # and on a call the client has just cancelled it dereferenced a freed call and
        # segfaulted the server (grpcio 1.85, WatchOperation cancelled as it ended).
        return time.perf_counter(), context.peer()

    def _end(self, method: str, started: float, peer: str, context: grpc.aio.ServicerContext, exempt: bool) -> None:
        if not exempt:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
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
        if isinstance(exc, JobStoreUnavailableError):
            # The shared job store (PostgreSQL) is down or restarting: nothing was committed by
            # the failed call, and it reconnects by itself, so the client retries.
            exc = Unavailable(f"{exc}; retry shortly", retry_after_s=1.0)
        if isinstance(exc, ServiceError):
            await context.abort_with_status(rpc_status.to_status(exc.to_status()))
        incident = uuid.uuid4().hex[:12]
        log.exception("unhandled error", extra={"method": method, "incident": incident})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); the server logs hold the details")


async def _bounded_stream(requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
    async for message in requests:
        if isinstance(message, Undecodable):
            raise message.error()
        if isinstance(message, Message):
            check_string_lengths(message)
        yield message


class Undecodable:
    """What the request deserializer hands on for bytes that are no message of the method's
    type. gRPC runs the deserializer outside every handler, so an exception there would reach
    the client as UNKNOWN "Unexpected <class 'DecodeError'>"; this marker reaches the wrapped
    handler instead, which answers INVALID_ARGUMENT before anything else runs (the
    authentication check included: nothing was asked of the server yet)."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request is not a valid {self.type_name} message (its bytes do not parse)")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "request"

    def deserialize(data: bytes) -> Any:  # noqa: ANN401 - whatever the method's message type is
        try:
            return deserializer(data)
        except DecodeError:
            return Undecodable(name)

    return deserialize


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
