"""The serving process's gRPC server, built in one place: its interceptors (outermost first),
its credentials, and every servicer it serves.

Where the cross-cutting concerns plug in:
- an interceptor: ``server_interceptors`` (the order is the list's: observability outermost,
  then authentication, then quota checks, then the servicer);
- the listening socket's credentials: the ``credentials`` argument of ``build_grpc_server``
  (None: insecure);
- what a servicer needs (the tenant's store, quotas): ``add_services``, which builds them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from framewise.v1 import info_service_pb2_grpc, jobs_service_pb2_grpc, tracking_service_pb2_grpc, vision_service_pb2_grpc
from server.config import ServerConfig
from server.interceptors import ObservabilityInterceptor
from server.metrics import Metrics
from server.quotas.enforcer import QuotaEnforcer
from server.quotas.interceptor import QuotaInterceptor
from server.reflection import enable_reflection
from server.sam2.session_registry import SessionRegistry
from server.servicers.info import InfoServicer
from server.servicers.jobs import JobServicer
from server.servicers.operations import OperationsServicer
from server.servicers.tracking import TrackingServicer
from server.servicers.vision import VisionServicer
from server.services import OPERATIONS_SERVICE, SERVICES
from server.wiring.inference import InferenceStack
from server.wiring.jobs import Jobs

__all__ = ["add_services", "build_grpc_server", "server_interceptors"]


def server_interceptors(
    metrics: Metrics, *, auth: grpc.aio.ServerInterceptor | None = None, quotas: QuotaEnforcer | None = None
) -> tuple[ObservabilityInterceptor, list[grpc.aio.ServerInterceptor]]:
    """The observability interceptor (the server drains through it) and the whole chain, outermost
    first. Observability stays outermost: it maps every error (an authentication or quota refusal
    included) to its status and counts every call, and during a drain it refuses new calls
    before anything else runs."""
    observability = ObservabilityInterceptor(metrics)
    chain: list[grpc.aio.ServerInterceptor] = [observability]
    if auth is not None:
        # Next: authentication (server/auth/): refuses calls without a valid credential or scope
        # and binds the caller's Principal, which the quota checks inside it read.
        chain.append(auth)
    if quotas is not None:
        # Innermost: the tenant's call rate per RPC family, read from the bound Principal.
        chain.append(QuotaInterceptor(quotas))
    return observability, chain


def build_grpc_server(
    config: ServerConfig,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    credentials: grpc.ServerCredentials | None,
) -> tuple[grpc.aio.Server, int]:
    """The server, listening on ``config.listen`` (not started) and the port it got.
    ``credentials``: TLS (and client-certificate) credentials for the listening port; None
    listens without TLS."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Two servers on one port would split the calls between them silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, credentials)
    except RuntimeError as exc:
        # grpcio reports a failed bind as port 0 or as RuntimeError("Failed to bind ..."),
        # depending on the version: both become the OSError `python -m server` reports.
        raise OSError(f"cannot listen on {config.listen} (address in use or invalid): {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {config.listen} (address in use or invalid)")
    return server, port


def add_services(
    server: grpc.aio.Server,
    config: ServerConfig,
    *,
    inference: InferenceStack,
    jobs: Jobs,
    sessions: SessionRegistry,
    health: health_aio.HealthServicer,
    managed_triton: bool,
    quotas: QuotaEnforcer | None = None,
) -> InfoServicer:
    """Every servicer, health and reflection; returns InfoServicer (it lists the replicas once
    the server knows its own address)."""
    vision = VisionServicer(
        inference.detection, inference.image_predictor, inference.matting, max_response_bytes=config.max_message_bytes
    )
    vision_service_pb2_grpc.add_VisionServiceServicer_to_server(vision, server)
    info = InfoServicer(inference.monitor, managed=managed_triton, replica_id=config.replica_id)
    info_service_pb2_grpc.add_InfoServiceServicer_to_server(info, server)
    jobs_service_pb2_grpc.add_JobServiceServicer_to_server(
        JobServicer(jobs.queue, jobs.bus, jobs.uploads, jobs.storage, media_root=config.jobs.media_root, quotas=quotas),
        server,
    )
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(jobs.queue, jobs.bus), server)
    tracking = TrackingServicer(
        inference.video_predictor,
        sessions,
        inference.metrics,
        frame_timeout_s=config.triton_timeout_s,
        quotas=quotas,
        idle_timeout_s=config.quotas.track_idle_timeout_s,
    )
    tracking_service_pb2_grpc.add_TrackingServiceServicer_to_server(tracking, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    enable_reflection((*(d.full_name for d in SERVICES.values()), OPERATIONS_SERVICE, health_service), server)
    return info
