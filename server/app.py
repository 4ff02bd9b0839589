"""Wires the orchestrator together and runs it until SIGTERM/SIGINT, then drains and stops."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from framewise.v1 import info_service_pb2_grpc, tracking_service_pb2_grpc, vision_service_pb2_grpc
from server import __version__
from server.app_jobs import Jobs, start_jobs
from server.cache.result_cache import ResultCache, result_cache_for
from server.cluster.membership import ReplicaMembership, advertised_address
from server.config import ServerConfig
from server.health import TritonMonitor
from server.interceptors import ObservabilityInterceptor
from server.jobs.worker.ipc import WorkerSettings
from server.metrics import Metrics, WithChildMetrics
from server.metrics_http import HealthReport, start_metrics_listener
from server.pipelines.detection import DetectionPipeline
from server.pipelines.matting import MattingPipeline
from server.pipelines.segmentation import SegmentationPipeline
from server.pipelines.sessions import SessionRegistry
from server.pipelines.tracking import TrackingEngine
from server.reflection import enable_reflection
from server.servicers.info import InfoServicer
from server.servicers.tracking import TrackingServicer
from server.servicers.vision import VisionServicer
from server.services import CACHED_MODELS, OPERATIONS_SERVICE, SERVICE_MODELS, SERVICES
from server.triton.client import TritonClient
from server.triton.launcher import ManagedTriton, TritonStartError
from server.triton.runner import InferenceRunner

log = logging.getLogger("server")


@dataclass
class RunningServer:
    """Handles to a started orchestrator, for `serve()` and for tests that embed it."""

    config: ServerConfig
    grpc_server: grpc.aio.Server
    port: int
    monitor: TritonMonitor
    sessions: SessionRegistry
    runner: InferenceRunner
    triton_client: TritonClient
    managed_triton: ManagedTriton | None
    metrics_port: int | None
    jobs: Jobs
    interceptor: ObservabilityInterceptor
    result_cache: ResultCache | None = None
    membership: ReplicaMembership | None = None

    async def stop(self) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new RPCs, drain in-flight ones, stop Triton."""
        log.info("shutting down", extra={"grace_s": self.config.shutdown_grace_s})
        started = time.monotonic()
        await self.monitor.stop()
        # Before the calls drain: a Track stream waiting for its next frame would hold the drain
        # for the whole grace period. Each live session goes to the shared store instead, and
        # its client resumes it on another replica (or on this one after its restart).
        await self.sessions.drain(self.config.shutdown_grace_s)
        # Watch streams end now (cleanly: a client resumes with after_sequence elsewhere or after
        # the restart) instead of holding the whole grace period and ending CANCELLED.
        self.jobs.bus.close()
        # The listener stays open while the calls in progress finish: new calls are refused with
        # UNAVAILABLE, but health keeps answering NOT_SERVING, so a load balancer or a probe sees
        # the drain instead of a CANCELLED check and then a refused connection.
        drained = await self.interceptor.drain(self.config.shutdown_grace_s)
        log.info("drained" if drained else "grace period over; cancelling the calls still running")
        await self.grpc_server.stop(max(self.config.shutdown_grace_s - (time.monotonic() - started), 0.0))
        if self.membership is not None:
            await self.membership.stop()
        # Running jobs stay RUNNING in the store and resume on the next start.
        await self.jobs.stop()
        if self.result_cache is not None:
            await self.result_cache.close()
        await self.sessions.stop()
        await self.runner.close()
        await self.triton_client.close()
        if self.managed_triton is not None:
            await self.managed_triton.stop()
        log.info("stopped")


async def start(config: ServerConfig) -> RunningServer:
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    managed: ManagedTriton | None = None
    if config.triton_url is None:
        if not all((config.model_repository / m / "config.pbtxt").exists() for m in monitor_models()):
            raise TritonStartError(
                f"no model repository at {config.model_repository}; build it with "
                "`python build_engines.py --target cpu` (what `make serve` does), "
                "or pass --triton-url for an external Triton"
            )
        managed = ManagedTriton(
            config.model_repository,
            config.triton_work_dir,
            config.triton_ports,
            startup_timeout_s=config.triton_startup_timeout_s,
        )
    triton_url = config.triton_url or managed.url  # type: ignore[union-attr]
    client = TritonClient(triton_url, metrics=metrics, default_timeout_s=config.triton_timeout_s)

    health = health_aio.HealthServicer()
    service_names = tuple(d.full_name for d in SERVICES.values())
    monitor = TritonMonitor(
        client, SERVICE_MODELS, health, metrics, interval_s=config.health_interval_s, reread_models=CACHED_MODELS
    )

    interceptor = ObservabilityInterceptor(metrics)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    use_shm = config.triton_shm == "on" or (config.triton_shm == "auto" and managed is not None)
    runner = InferenceRunner(client, metrics, shm_slots_per_model=config.triton_shm_slots if use_shm else 0)
    # Emptied here, before the job worker (which opens the same file) starts: see server/cache.
    result_cache = result_cache_for(config, metrics)
    if result_cache is not None:
        await result_cache.open(clear=True)
    detection = DetectionPipeline(runner, monitor, metrics, max_pixels=config.max_image_pixels, cache=result_cache)
    segmentation = SegmentationPipeline(runner, monitor, max_pixels=config.max_image_pixels)
    matting = MattingPipeline(runner, monitor, max_pixels=config.max_image_pixels, metrics=metrics, cache=result_cache)
    vision_service_pb2_grpc.add_VisionServiceServicer_to_server(
        VisionServicer(detection, segmentation, matting, max_response_bytes=config.max_message_bytes), server
    )
    info = InfoServicer(monitor, managed=managed is not None, replica_id=_replica_id(config))
    info_service_pb2_grpc.add_InfoServiceServicer_to_server(info, server)
    tracking = TrackingEngine(runner, monitor, max_pixels=config.max_image_pixels, max_objects=config.max_objects_per_session)
    worker = None
    if config.jobs.process == "worker":
        # Jobs run at most `concurrency` at a time: that many slots per model cover them.
        shm_slots = min(config.triton_shm_slots, config.jobs.concurrency) if use_shm else 0
        worker = WorkerSettings(config, triton_url, shm_slots)
    jobs = await start_jobs(
        config.jobs, detection=detection, matting=matting, tracking=tracking, metrics=metrics, worker=worker,
        replica_id=config.replica_id,
    )
    jobs.add_to_server(server)
    # Sessions a draining replica hands off go to the job store every replica shares.
    sessions = SessionRegistry(
        metrics,
        max_sessions=config.max_tracking_sessions,
        idle_ttl_s=config.session_idle_ttl_s,
        replica_id=config.replica_id,
        handoff=jobs.store,
    )
    tracking_service_pb2_grpc.add_TrackingServiceServicer_to_server(
        TrackingServicer(tracking, sessions, metrics, frame_timeout_s=config.triton_timeout_s), server
    )
    monitor.conditions[SERVICES["jobs"].full_name] = jobs.not_serving_reason
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection((*service_names, OPERATIONS_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen} (address in use or invalid)")
    # Registered in the job store (the cluster's, when it is shared) once jobs start; GetServerInfo
    # lists every replica registered there.
    membership = ReplicaMembership(
        jobs.store,
        _replica_id(config),
        advertised_address(config.listen, port),
        heartbeat=config.jobs.store_path is None,  # SQLite: one replica, nobody else to tell
    )
    info.membership = membership
    # Listen before Triton is up, so health checks answer NOT_SERVING during startup.
    await server.start()
    await monitor.refresh()

    worker_process = jobs.worker
    exposed = (
        registry if worker_process is None else WithChildMetrics(registry, lambda: worker_process.metrics_text, "job_worker")
    )
    metrics_port = start_metrics_listener(config.metrics_listen, exposed, _healthz(monitor, _replica_id(config)))

    if managed is not None:
        try:
            await managed.start()
        except BaseException:
            await managed.stop()
            await server.stop(0)
            await runner.close()
            await client.close()
            await jobs.stop()
            if result_cache is not None:
                await result_cache.close()
            raise
    await monitor.start()
    await sessions.start()
    await jobs.start()
    await membership.start()
    _log_models(monitor)
    log.info(
        "framewise serving",
        extra={
            "version": __version__,
            "listen": config.listen,
            "port": port,
            "triton_url": triton_url,
            "triton_managed": managed is not None,
            "metrics_port": metrics_port,
            "serving": monitor.serving,
            "triton_shared_memory": use_shm,
        },
    )
    return RunningServer(
        config, server, port, monitor, sessions, runner, client, managed, metrics_port, jobs, interceptor,
        result_cache=result_cache, membership=membership,
    )


def _replica_id(config: ServerConfig) -> str:
    """This replica's name (--replica-id; the config defaults it to host name and PID)."""
    return config.replica_id


def monitor_models() -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for models in SERVICE_MODELS.values() for m in models))


def _healthz(monitor: TritonMonitor, replica_id: str) -> Callable[[], HealthReport]:
    """/healthz (server/metrics_http.py) from what grpc.health.v1 reports: 200 while the server
    as a whole is SERVING (Triton and its models ready) and not draining. JobService's own
    NOT_SERVING (its store unreachable, low disk) does not fail it: the store and the storage
    are shared, so every replica would fail together and a load balancer would have none left,
    while vision and tracking calls still work; JobService answers UNAVAILABLE with the reason."""

    def report() -> HealthReport:
        statuses, draining = monitor.statuses, monitor.shutting_down
        return statuses.get("", False) and not draining, {
            "replica_id": replica_id,
            "draining": draining,
            "services": {name: "SERVING" if ok else "NOT_SERVING" for name, ok in statuses.items()},  # "": the server
            "reason": monitor.state.last_error,
        }

    return report


def _log_models(monitor: TritonMonitor) -> None:
    for name, spec in monitor.specs().items():
        if spec.stand_in:
            log.warning(
                "model is a STAND-IN contract model, not the real network: outputs have the right shapes but no learned meaning",
                extra={"model": name, "version": spec.version},
            )
        else:
            log.info("model loaded", extra={"model": name, "version": spec.version, "source": spec.source, "backend": spec.backend})


async def serve(config: ServerConfig) -> None:
    running = await start(config)
    # What exists now (modules, protobuf descriptors, clients, the wiring) lives as long as the
    # process: frozen out of the cyclic collector, a full collection walks only what requests
    # left behind. Over the whole heap it stalled the event loop, and every watch and tracking
    # stream with it, for up to ~30 ms (measured during bench/jobs_bench.py).
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
