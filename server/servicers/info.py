"""InfoService: server version, models (real or stand-in), Triton endpoint state, and which
replica answered among the replicas the cluster knows."""

from __future__ import annotations

import asyncio
import logging

import grpc

from framewise.v1 import info_service_pb2, info_service_pb2_grpc
from server import __version__
from server.cluster.membership import ReplicaMembership
from server.jobs.store import JobStoreError
from server.triton.model_spec import TensorSpec
from server.triton.monitor import TritonMonitor


log = logging.getLogger(__name__)

# How long GetServerInfo waits for the replica list from the job store.
REPLICAS_TIMEOUT_S = 2.0


class InfoServicer(info_service_pb2_grpc.InfoServiceServicer):
    def __init__(
        self,
        monitor: TritonMonitor,
        *,
        managed: bool,
        replica_id: str = "",
        membership: ReplicaMembership | None = None,
    ) -> None:
        self.monitor = monitor
        self.managed = managed
        self.replica_id = replica_id
        self.membership = membership
        # The transport and authentication settings this replica started with (set by the
        # composition root once the listen address is known: server/transport/ builds it).
        self.security: info_service_pb2.SecurityInfo | None = None

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
        response.replica_id = self.replica_id
        if self.security is not None:
            response.security.CopyFrom(self.security)
        if self.membership is not None:
            try:
                # Bounded: a store that is going down may hold a query for its pool's whole timeout.
                views = await asyncio.wait_for(self.membership.replicas(), REPLICAS_TIMEOUT_S)
            except (JobStoreError, TimeoutError) as exc:
                # The store is down (jobs' health says so); the rest of the answer still holds.
                log.debug("replicas unknown: the job store is unavailable", extra={"error": str(exc)})
                views = []
            for view in views:
                replica = response.replicas.add(
                    replica_id=view.record.replica_id, address=view.record.address, live=view.live
                )
                replica.register_time.FromDatetime(view.record.register_time)
                replica.heartbeat_time.FromDatetime(view.record.heartbeat_time)
        return response


def _tensors(tensors: tuple[TensorSpec, ...]) -> list[info_service_pb2.TensorSpec]:
    return [info_service_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=list(t.shape)) for t in tensors]
