"""The quota interceptor: each call takes a token from its tenant's bucket for the call's RPC
family before the servicer runs; an empty bucket ends the call with RESOURCE_EXHAUSTED
(QuotaFailure + RetryInfo) and the servicer never sees it.

It sits inside the authentication interceptor (the server's interceptor list: observability,
authentication, quotas), so the principal is bound when the wrapped handler runs and the
tenant is ``current_principal().tenant``. The check is in the wrapped handler, not in
``intercept_service``: the latter runs before authentication has bound anyone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from server.auth.principal import current_principal
from server.quotas.enforcer import QuotaEnforcer
from server.quotas.families import family_of as default_family_of
from server.rpc_handlers import responses, wrap_handler

__all__ = ["QuotaInterceptor"]


class QuotaInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, quotas: QuotaEnforcer, family_of: Callable[[str], str | None] = default_family_of) -> None:
        """``family_of``: full method name -> RPC family (the authorization scope the method
        needs); None for methods no quota counts (health, reflection)."""
        self.quotas = quotas
        self.family_of = family_of

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        family = self.family_of(handler_call_details.method)
        if handler is None or family is None:
            return handler
        return wrap_handler(
            handler,
            lambda behavior, _streaming: self._unary(behavior, family),
            lambda behavior, _streaming: self._stream(behavior, family),
        )

    def _unary(self, behavior, family: str):  # noqa: ANN001, ANN202 - grpc handler types
        check = self.quotas.check_rate

        async def wrapped(request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN202
            principal = current_principal()
            if principal.has_quotas:
                check(principal.tenant, family)
            return await behavior(request, context)

        return wrapped

    def _stream(self, behavior, family: str):  # noqa: ANN001, ANN202
        check = self.quotas.check_rate

        async def wrapped(request, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:  # noqa: ANN001
            principal = current_principal()
            if principal.has_quotas:
                check(principal.tenant, family)
            async with responses(behavior(request, context)) as messages:
                async for message in messages:
                    yield message

        return wrapped
