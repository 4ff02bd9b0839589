"""Server reflection that also answers for method names, so ghz and grpcurl work.

ghz and grpcurl ask reflection for the file containing "pkg.Service.Method"; the upb-backed
default pool does not index method names, so the stock Python servicer answers NOT_FOUND
(grpc/grpc#34743, bojand/ghz#419).
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_reflection.v1alpha import reflection


class _MethodAwarePool:
    """The default descriptor pool, whose FindFileContainingSymbol also resolves methods."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def __getattr__(self, name: str):  # noqa: ANN204 - every other lookup goes to the real pool
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:  # noqa: N802 - the pool's API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method_name = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)  # KeyError when not a service either
            if method_name not in service.methods_by_name:
                raise
            return service.file


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    reflection.enable_server_reflection(
        (*service_names, reflection.SERVICE_NAME), server, pool=_MethodAwarePool(descriptor_pool.Default())
    )
