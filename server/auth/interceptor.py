"""The authentication interceptor: who is calling, and may they call this method.

It sits inside ObservabilityInterceptor (which maps the Unauthenticated / PermissionDenied it
raises to their status and counts every call) and outside the quota checks and the servicers.
For each call that is not open (health and reflection by default):

1. credentials: ``authorization: Bearer <API key or JWT>``, or a verified client certificate
   that the mTLS tenant map knows (server/auth/authenticator.py);
2. a refusal: UNAUTHENTICATED saying what is expected (never why the presented credential
   failed), after a delay that grows with the peer's recent failures (server/auth/backoff.py),
   one audit line and ``framewise_auth_total{outcome="missing"|"refused"}``;
3. the method's scope (server/auth/scopes.py): PERMISSION_DENIED naming it when missing;
4. the Principal is bound (server.auth.principal.bind_principal) inside the wrapped handler,
   so the servicer's task sees it, and unbound when the call ends.

``--auth auto``: while no key exists and nothing else is configured, calls run as the
anonymous principal; the store is asked again at most every ``recheck_s`` whether a key exists,
and once one does, credentials are required from then on (keys are never deleted, only
revoked, so this never falls back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.auth import audit
from server.auth.authenticator import Authenticator
from server.auth.backoff import FailureBackoff
from server.auth.principal import Principal, bind_principal, unbind_principal
from server.auth.scopes import is_open, required_scope
from server.errors import PermissionDenied, Unauthenticated
from server.rpc_handlers import responses, wrap_handler
from server.metrics import Metrics
from server.transport.identity import ClientIdentity, client_identity_of

__all__ = ["AuthInterceptor"]

log = logging.getLogger("server.auth")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator,
        metrics: Metrics,
        *,
        mode: str,
        open_methods: tuple[str, ...],
        backoff: FailureBackoff,
        has_api_keys: Callable[[], Awaitable[bool]],
        static_required: bool = False,
        recheck_s: float = 2.0,
        identity_of: Callable[[Any], ClientIdentity | None] = client_identity_of,
    ) -> None:
        if mode not in ("off", "auto", "required"):
            raise ValueError(f"auth mode must be off, auto or required, got {mode!r}")
        self.authenticator = authenticator
        self.metrics = metrics
        self.mode = mode
        self.open_methods = open_methods
        self.backoff = backoff
        self._has_api_keys = has_api_keys
        self._recheck_s = recheck_s
        self._identity_of = identity_of
        # Once True, stays True (see the module docstring).
        self._required = mode == "required" or (mode == "auto" and static_required)
        self._checked_at = -float("inf")
        # Called once when auto mode turns authentication on (a key appeared in the store), so
        # what the server reports about itself (GetServerInfo) follows.
        self.on_required: Callable[[], None] | None = None
        self._refresh: asyncio.Future[bool] | None = None
        # framewise_auth_total's children by (outcome, via): labels() costs more than the
        # increment, and this runs on every call.
        self._counters: dict[tuple[str, str], Any] = {}
        # method -> (the server's handler, this interceptor's wrapping of it)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    @property
    def required(self) -> bool:
        """Whether calls need credentials now (as of the last check in auto mode)."""
        return self._required

    async def refresh_required(self) -> bool:
        """Asks the store now (auto mode); what the startup posture uses."""
        if not self._required and self.mode == "auto":
            # An error (the store unreachable) propagates: the call fails UNAVAILABLE, and the
            # next one asks again rather than running as anonymous on an unknown answer.
            if await self._has_api_keys():
                self._required = True
                log.warning("an API key exists in the job store: authentication is required from now on")
                if self.on_required is not None:
                    self.on_required()
            self._checked_at = time.monotonic()
        return self._required

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.mode == "off" or is_open(method, self.open_methods):
            return handler
        # The server hands out the same handler object for a method on every call: wrap it once.
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return wrap_handler(
            handler,
            lambda behavior, _streaming: self._wrap_unary(method, behavior),
            lambda behavior, _streaming: self._wrap_stream(method, behavior),
        )

    def _wrap_unary(self, method: str, behavior):
        async def wrapped(request, context: grpc.aio.ServicerContext):
            admitted = await self._admit(method, context)
            if admitted is None:
                return await behavior(request, context)
            tokens = _bind(*admitted)
            try:
                return await behavior(request, context)
            finally:
                self._end(admitted[1], tokens)

        return wrapped

    def _wrap_stream(self, method: str, behavior):
        async def wrapped(request, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            admitted = await self._admit(method, context)
            tokens = _bind(*admitted) if admitted is not None else None
            try:
                async with responses(behavior(request, context)) as messages:
                    async for message in messages:
                        yield message
            finally:
                if admitted is not None:
                    self._end(admitted[1], tokens)

        return wrapped

    async def _is_required(self) -> bool:
        if self._required or self.mode != "auto":
            return self._required
        if time.monotonic() - self._checked_at < self._recheck_s:
            return False
        # One store read at a time, however many calls arrive while it runs.
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self.refresh_required())
            self._refresh.add_done_callback(self._refreshed)
        return await asyncio.shield(self._refresh)

    def _refreshed(self, task: asyncio.Future[bool]) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()  # retrieved here too: each waiter got it already

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> tuple[Principal, audit.CallInfo] | None:
        """The principal the call runs as, or None for the anonymous one (auth not required
        yet); raises Unauthenticated / PermissionDenied."""
        if not await self._is_required():
            return None
        # Read once, while the call is alive (see ObservabilityInterceptor._begin).
        peer = context.peer()
        authorization = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            for k, v in (context.invocation_metadata() or ())
            if k == "authorization"
        ]
        identity = self._identity_of(context) if self.authenticator.uses_certificates else None
        verdict = await self.authenticator.authenticate(authorization, identity)
        principal = verdict.principal
        if principal is None:
            outcome = "refused" if verdict.presented else "missing"
            self._count(outcome, verdict.via).inc()
            audit.auth_failure(
                method=method, peer=peer, via=verdict.via, subject=verdict.subject, reason=verdict.reason,
                tenant=verdict.tenant,
            )
            # Slow the answer, not the server: only this call waits.
            await asyncio.sleep(self.backoff.failed(peer))
            expected = self.authenticator.expected()
            if verdict.presented:
                raise Unauthenticated(f"the credential presented was not accepted; this server requires {expected}")
            raise Unauthenticated(f"this server requires {expected}")
        scope = required_scope(method)
        if scope is not None and not principal.allows(scope):
            self._count("denied", verdict.via).inc()
            audit.permission_denied(
                method=method, peer=peer, via=verdict.via, subject=principal.subject, tenant=principal.tenant, scope=scope
            )
            raise PermissionDenied(
                f"{method.rsplit('/', 1)[-1]} needs the scope '{scope}', which this credential does not grant"
            )
        self._count("ok", verdict.via).inc()
        call = audit.CallInfo(method=method, peer=peer, tenant=principal.tenant, subject=principal.subject, via=verdict.via)
        return principal, call

    def _count(self, outcome: str, via: str) -> Any:
        counter = self._counters.get((outcome, via))
        if counter is None:
            counter = self._counters[(outcome, via)] = self.metrics.auth_total.labels(outcome, via)
        return counter

    def _end(self, call: audit.CallInfo, tokens: tuple[Any, Any] | None) -> None:
        if call.cross_tenant_attempts:
            self._count("cross_tenant", call.via).inc(call.cross_tenant_attempts)
        if tokens is not None:
            # A stream closed from another context cannot reset there; its context ends with it.
            with contextlib.suppress(ValueError):
                audit.unbind_call(tokens[1])
            with contextlib.suppress(ValueError):
                unbind_principal(tokens[0])


def _bind(principal: Principal, call: audit.CallInfo) -> tuple[Any, Any]:
    return bind_principal(principal), audit.bind_call(call)
