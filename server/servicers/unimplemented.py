"""Servicers for the parts of the API that later versions implement.

Every method answers UNIMPLEMENTED with a message naming what is missing, so a client built
against the full framewise.v1 API gets a clear answer rather than "method not found".
"""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor


async def abort_unimplemented(context: grpc.aio.ServicerContext, method: str, reason: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented in this version: {reason}")


def unimplemented_servicer(base: type, service: ServiceDescriptor, reason: str) -> object:
    """An instance of the generated servicer `base` whose every RPC aborts UNIMPLEMENTED."""

    def make(method_name: str):  # noqa: ANN202
        async def method(self, request, context: grpc.aio.ServicerContext):  # noqa: ANN001, ANN202
            await abort_unimplemented(context, f"{service.full_name}/{method_name}", reason)

        return method

    namespace = {m.name: make(m.name) for m in service.methods}
    return type(f"Unimplemented{service.name}", (base,), namespace)()
