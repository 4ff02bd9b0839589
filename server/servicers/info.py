"""InfoService: server version, models (real or stand-in), Triton endpoint state."""

from __future__ import annotations

import grpc

from framewise.v1 import info_service_pb2, info_service_pb2_grpc
from server import __version__
from server.health import TritonMonitor
from server.triton.model_spec import TensorSpec


class InfoServicer(info_service_pb2_grpc.InfoServiceServicer):
    def __init__(self, monitor: TritonMonitor, *, managed: bool) -> None:
        self.monitor = monitor
        self.managed = managed

    async def GetServerInfo(
        self, request: info_service_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> info_service_pb2.GetServerInfoResponse:
        state = self.monitor.state
        response = info_service_pb2.GetServerInfoResponse(
            server_version=__version__,
            serving=self.monitor.serving,
            triton=info_service_pb2.TritonEndpoint(
                url=self.monitor.client.url,
                managed=self.managed,
                live=state.live,
                ready=state.ready,
                server_version=state.server_version,
                last_error=state.last_error,
            ),
        )
        specs = self.monitor.specs()
        for name in self.monitor.watched_models:
            spec = specs.get(name)
            required = name in self.monitor.required_models
            status = response.models.add(name=name, required=required, ready=state.model_ready.get(name, False))
            if spec is not None:
                status.version = spec.version
                status.stand_in = spec.stand_in
                status.network = spec.network
                status.backend = spec.backend
                status.source = spec.source
                status.max_batch_size = spec.max_batch_size
                status.inputs.extend(_tensors(spec.inputs))
                status.outputs.extend(_tensors(spec.outputs))
        return response


def _tensors(tensors: tuple[TensorSpec, ...]) -> list[info_service_pb2.TensorSpec]:
    return [info_service_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in tensors]
