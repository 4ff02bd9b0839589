"""The serving process: builds the orchestrator from its parts (server/wiring/, the composition
root both processes share), runs it until SIGTERM/SIGINT, then drains and stops."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from server import __version__
from server.auth.layer import AuthLayer, auth_required_at_start, build_auth
from server.cluster.membership import ReplicaMembership, advertised_address
from server.config import ServerConfig
from server.interceptors import ObservabilityInterceptor
from server.jobs.worker.ipc import WorkerSettings
from server.metrics import Metrics, WithChildMetrics
from server.metrics_http import HealthReport, start_metrics_listener
from server.quotas.build import TenantStorage, build_quota_enforcer
from server.quotas.enforcer import QuotaEnforcer
from server.sam2.session_registry import SessionRegistry
from server.services import SERVICE_MODELS, SERVICES
from server.triton.launcher import ManagedTriton, TritonStartError
from server.transport import log_posture, resolve_posture, server_credentials
from server.triton.monitor import TritonMonitor
from server.wiring.grpc_server import add_services, build_grpc_server, server_interceptors
from server.wiring.inference import InferenceStack, build_inference_stack, shared_memory_slots
from server.wiring.jobs import Jobs, start_jobs

log = logging.getLogger("server")


@dataclass
class RunningServer:
    """Handles to a started orchestrator, for `serve()` and for tests that embed it."""

    config: ServerConfig
    grpc_server: grpc.aio.Server
    port: int
    inference: InferenceStack
    sessions: SessionRegistry
    managed_triton: ManagedTriton | None
    metrics_port: int | None
    jobs: Jobs
    interceptor: ObservabilityInterceptor
    membership: ReplicaMembership | None = None
    quotas: QuotaEnforcer | None = None
    auth: AuthLayer | None = None

    @property
    def monitor(self) -> TritonMonitor:
        return self.inference.monitor

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
        if self.quotas is not None:
            # Every call has ended: this replica's session slots are freed (a handed-off session
            # takes one again where it resumes) while the store is still open.
            await self.quotas.stop()
        if self.membership is not None:
            await self.membership.stop()
        # Running jobs stay RUNNING in the store and resume on the next start.
        await self.jobs.stop()
        await self.sessions.stop()
        if self.auth is not None:
            await self.auth.close()
        await self.inference.close()
        if self.managed_triton is not None:
            await self.managed_triton.stop()
        log.info("stopped")


async def start(config: ServerConfig) -> RunningServer:
    """Builds the serving process in one order (Triton, the inference stack, jobs, sessions, the
    gRPC server), listens, then starts Triton and the loops. Call ``stop`` on the result."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    # Who may reach the gRPC port, decided before anything starts: a refused public listener
    # (no authentication, no --allow-unauthenticated-public) stops here. The listen address is
    # resolved once ("" -> loopback, or every interface when callers must authenticate) and the
    # rest of the start uses it.
    posture = resolve_posture(
        config.listen,
        config.transport,
        # --auth required, a JWT issuer or mTLS tenant map, or (--auth auto) a key in the store.
        auth_required=await auth_required_at_start(config.auth, config.jobs.store),
        auth_mode=config.auth.mode,
    )
    config = replace(config, listen=posture.listen)
    # Read and checked now, so a wrong key or an unreadable certificate stops the start here.
    credentials = server_credentials(config.transport.tls) if config.transport.tls.enabled else None
    managed = _managed_triton(config)
    triton_url = config.triton_url or managed.url  # type: ignore[union-attr]
    shm_slots = shared_memory_slots(config, managed_triton=managed is not None)
    health = health_aio.HealthServicer()
    inference = build_inference_stack(
        config, metrics, triton_url=triton_url, shm_slots=shm_slots, service_models=SERVICE_MODELS, health=health
    )
    monitor = inference.monitor
    # Emptied here, before the job worker (which opens the same file) starts: see server/cache.
    await inference.open_cache(clear=True)
    worker = None
    if config.jobs.process == "worker":
        # Jobs run at most `concurrency` at a time: that many slots per model cover them.
        worker = WorkerSettings(config, triton_url, min(shm_slots, config.jobs.concurrency))
    jobs = await start_jobs(
        config.jobs,
        detection=inference.detection,
        matting=inference.matting,
        video_predictor=inference.video_predictor,
        metrics=metrics,
        worker=worker,
        replica_id=config.replica_id,
    )
    monitor.conditions[SERVICES["jobs"].full_name] = jobs.not_serving_reason
    # Sessions a draining replica hands off go to the job store every replica shares.
    sessions = SessionRegistry(
        metrics,
        max_sessions=config.max_tracking_sessions,
        idle_ttl_s=config.session_idle_ttl_s,
        replica_id=config.replica_id,
        handoff=jobs.store,
    )
    # Per-tenant quotas, held in the job store every replica shares (server/quotas/).
    quotas = build_quota_enforcer(
        config.quotas,
        jobs.store,
        replica_id=config.replica_id,
        session_alive=lambda tenant, key: sessions.held(key, tenant=tenant) is not None,
        storage=TenantStorage(jobs.store, jobs.storage, jobs.uploads, cache_s=config.quotas.refresh_s),
        metrics=metrics,
    )

    # Who is calling (API keys and JWTs checked against the shared store and the JWKS file).
    auth = await build_auth(config.auth, jobs.store, metrics)
    interceptor, interceptors = server_interceptors(metrics, auth=auth.interceptor, quotas=quotas)
    # Credentials for the listening port: None listens without TLS.
    server, port = build_grpc_server(config, interceptors=interceptors, credentials=credentials)
    info = add_services(
        server,
        config,
        inference=inference,
        jobs=jobs,
        sessions=sessions,
        health=health,
        managed_triton=managed is not None,
        quotas=quotas,
    )
    # Registered in the job store (the cluster's, when it is shared) once jobs start; GetServerInfo
    # lists every replica registered there.
    membership = ReplicaMembership(
        jobs.store,
        _replica_id(config),
        advertised_address(config.listen, port),
        heartbeat=config.jobs.store_path is None,  # SQLite: one replica, nobody else to tell
    )
    info.membership = membership
    info.security = posture.info()
    security = info.security

    def _authentication_now_required() -> None:
        # --auth auto: the first key was created while this server ran (the listen address
        # chosen at start stays as it was).
        security.authentication_required = True

    auth.interceptor.on_required = _authentication_now_required
    # Listen before Triton is up, so health checks answer NOT_SERVING during startup. Published
    # before listening: grpc's HealthServicer starts with the server ("") SERVING, and until the
    # first refresh had asked Triton a probe (or a load balancer) took a starting replica for
    # ready, and its first calls got UNAVAILABLE "not checked yet".
    await monitor.publish()
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
            await jobs.stop()
            await inference.close()
            raise
    await monitor.start()
    await sessions.start()
    await quotas.start()
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
            "triton_shared_memory": shm_slots > 0,
        },
    )
    log_posture(log, posture)
    return RunningServer(
        config, server, port, inference, sessions, managed, metrics_port, jobs, interceptor, membership=membership,
        quotas=quotas, auth=auth,
    )


def _managed_triton(config: ServerConfig) -> ManagedTriton | None:
    """The tritonserver this process starts and stops, unless --triton-url names an external one."""
    if config.triton_url is not None:
        return None
    if not all((config.model_repository / m / "config.pbtxt").exists() for m in monitor_models()):
        raise TritonStartError(
            f"no model repository at {config.model_repository}; build it with "
            "`python build_engines.py --target cpu` (what `make serve` does), "
            "or pass --triton-url for an external Triton"
        )
    return ManagedTriton(
        config.model_repository,
        config.triton_work_dir,
        config.triton_ports,
        startup_timeout_s=config.triton_startup_timeout_s,
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
