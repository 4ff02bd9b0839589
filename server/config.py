"""Orchestrator settings: command-line flags, each with a FRAMEWISE_* environment fallback."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from server.auth.config import AuthConfig, add_auth_flags, auth_config_from_args
from server.quotas.limits import QuotaConfig, add_quota_flags, quota_config_from_args
from server.transport import TransportSettings, tls_settings
from server.triton.launcher import DEFAULT_TRITON_BIND_ADDRESS, TritonPorts

REPO_ROOT = Path(__file__).resolve().parent.parent


DAY_S = 86400.0


@dataclass(frozen=True)
class JobsConfig:
    """Long-running jobs: durable store, storage tiers, queue and slots, D-ID."""

    # The job store (--job-store): a SQLite file path or sqlite:///path (one replica), or a
    # postgresql:// URL (the store replicas share); server/jobs/store/factory.py opens it.
    store: str = str(REPO_ROOT / ".cache" / "jobs" / "jobs.sqlite3")
    # SQLite synchronous mode of the job store: "full" fsyncs every commit (an event a watcher
    # saw survives a power cut); "normal" survives kill -9 of the server, not a power cut.
    store_sync: str = "full"
    storage_root: Path = REPO_ROOT / ".cache" / "storage"
    # SegmentVideoRequest.server_path is resolved under this folder; None disables it.
    media_root: Path | None = None
    # Jobs running at once on this replica (the job queue's lanes; flag --job-concurrency).
    concurrency: int = 4
    # "worker": jobs run in a child process at lower CPU priority (job_worker_nice), so a job's
    # work never delays the serving process's event loop (watch streams, tracking); "inline":
    # in the serving process.
    process: str = "worker"
    worker_nice: int = 10
    max_queued: int = 64
    heartbeat_s: float = 30.0
    detection_slots: int = 2
    matting_slots: int = 1
    tracking_slots: int = 1
    retry_base_s: float = 1.0
    max_upload_bytes: int = 2 * 1024**3
    retention_uploads_s: float = 7 * DAY_S
    retention_processed_s: float = 3 * DAY_S
    retention_videos_s: float = 30 * DAY_S
    retention_temp_s: float = 3600.0
    # Finished operations (row, events, artifacts) are deleted this long after they ended.
    retention_operations_s: float = 30 * DAY_S
    cleanup_interval_s: float = 3600.0
    low_disk_bytes: int = 5 * 10**9
    disk_check_interval_s: float = 10.0
    did_url: str = "https://api.d-id.com"
    # None: talking videos are refused with FAILED_PRECONDITION.
    did_api_key: str | None = None
    # Set by `make serve` when it starts the local emulator instead of D-ID.
    did_is_emulator: bool = False
    did_timeout_s: float = 30.0
    did_poll_interval_s: float = 2.0
    did_wait_timeout_s: float = 600.0
    # A talking video with all_persons makes at most this many D-ID talks (each one is billed).
    max_talk_persons: int = 4
    # A claimed job's lease (--job-lease): a replica that stops renewing it (killed, frozen,
    # cut off from the store) loses the job to another replica this long after its last renewal.
    lease_s: float = 15.0
    # Seconds between renewals (--job-lease-renew); None: a third of the lease.
    lease_renew_s: float | None = None

    @property
    def store_path(self) -> Path | None:
        """The SQLite file of the job store; None when it is PostgreSQL."""
        from server.jobs.store.factory import sqlite_path  # server.jobs imports this module

        return sqlite_path(self.store)


@dataclass(frozen=True)
class ServerConfig:
    # "": chosen at startup (server/transport/exposure.py default_listen): 0.0.0.0:50051 when
    # callers must authenticate, 127.0.0.1:50051 when they need not.
    listen: str = ""
    # Loopback by default: /metrics names models and replicas, and /healthz is for a load
    # balancer on the same host or network (give a private address for a remote one).
    metrics_listen: str = "127.0.0.1:9091"  # empty: no metrics endpoint
    # External Triton (production). None: start the bundled tritonserver (embedded CPU default).
    triton_url: str | None = None
    model_repository: Path = REPO_ROOT / ".cache" / "model_repository_cpu"
    triton_work_dir: Path = REPO_ROOT / ".cache" / "triton"
    triton_ports: TritonPorts = TritonPorts()
    triton_startup_timeout_s: float = 180.0
    triton_timeout_s: float = 30.0
    # Tensors through POSIX shared memory: "auto" = when the orchestrator runs Triton itself.
    triton_shm: str = "auto"
    triton_shm_slots: int = 16
    # A shared-memory slot free this long gives its pages back (0: never). Far longer than the gap
    # between a stream's frames or a load test's requests, so a busy slot never maps its pages
    # again; short enough that a slot used once in a while (a tracking session's prompt-frame
    # decoder call: ~50 MiB at 3 objects, S = 1024) does not hold them through the whole session.
    triton_shm_idle_release_s: float = 10.0
    max_message_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    shutdown_grace_s: float = 10.0
    max_tracking_sessions: int = 16
    max_objects_per_session: int = 8
    session_idle_ttl_s: float = 300.0
    health_interval_s: float = 1.0
    # Bound of the detection / matting result cache (server/cache/), in bytes; 0 disables it.
    result_cache_bytes: int = 256 * 1024**2
    log_level: str = "INFO"
    log_format: str = "json"  # or "text"
    # This replica's name (--replica-id): job leases, operation metadata, session messages.
    # "": host name and PID (parse_args resolves it, so the job worker process sees the same).
    replica_id: str = ""
    jobs: JobsConfig = JobsConfig()
    # TLS / mutual TLS on the gRPC port, and the explicit permission to listen publicly without
    # authentication (server/transport/).
    transport: TransportSettings = TransportSettings()
    # Who may call: --auth, API keys, JWTs, mTLS identities (server/auth/).
    auth: AuthConfig = AuthConfig()
    # Per-tenant quota defaults (--quota-*; per-tenant overrides live in the job store).
    quotas: QuotaConfig = QuotaConfig()


def _env(name: str, default: object) -> str | None:
    value = os.environ.get(f"FRAMEWISE_{name}")
    return value if value is not None else (None if default is None else str(default))


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m server", description="Framewise gRPC orchestrator")
    p.add_argument("--listen", default=_env("LISTEN", d.listen),
                   help="gRPC address (FRAMEWISE_LISTEN; default 127.0.0.1:50051, or 0.0.0.0:50051 when callers must "
                        "authenticate); a non-loopback address without authentication needs --allow-unauthenticated-public")
    p.add_argument("--metrics-listen", default=_env("METRICS_LISTEN", d.metrics_listen),
                   help="Prometheus /metrics and /healthz host:port, empty to disable (FRAMEWISE_METRICS_LISTEN; "
                        "default 127.0.0.1:9091)")
    p.add_argument("--triton-url", default=_env("TRITON_URL", None),
                   help="external Triton gRPC address; unset starts the bundled tritonserver (FRAMEWISE_TRITON_URL)")
    p.add_argument("--model-repository", type=Path, default=_env("MODEL_REPOSITORY", d.model_repository),
                   help="repository for the bundled Triton (FRAMEWISE_MODEL_REPOSITORY)")
    p.add_argument("--triton-work-dir", type=Path, default=_env("TRITON_WORK_DIR", d.triton_work_dir))
    p.add_argument("--triton-grpc-port", type=int, default=_env("TRITON_GRPC_PORT", d.triton_ports.grpc))
    p.add_argument("--triton-http-port", type=int, default=_env("TRITON_HTTP_PORT", d.triton_ports.http))
    p.add_argument("--triton-metrics-port", type=int, default=_env("TRITON_METRICS_PORT", d.triton_ports.metrics))
    p.add_argument("--triton-bind-address", default=_env("TRITON_BIND_ADDRESS", DEFAULT_TRITON_BIND_ADDRESS),
                   help="address the bundled tritonserver's HTTP, gRPC and metrics ports bind to (FRAMEWISE_TRITON_BIND_ADDRESS; "
                        "default 127.0.0.1: Triton has no authentication, so only a private network address belongs here)")
    p.add_argument("--triton-startup-timeout", type=float, default=_env("TRITON_STARTUP_TIMEOUT", d.triton_startup_timeout_s))
    p.add_argument("--triton-timeout", type=float, default=_env("TRITON_TIMEOUT", d.triton_timeout_s),
                   help="seconds per Triton inference unless the RPC's deadline is sooner")
    p.add_argument("--triton-shm", choices=("auto", "on", "off"), default=_env("TRITON_SHM", d.triton_shm),
                   help="pass tensors to Triton through system shared memory (auto: only for the managed child)")
    p.add_argument("--triton-shm-slots", type=int, default=_env("TRITON_SHM_SLOTS", d.triton_shm_slots),
                   help="concurrent requests per model that use shared memory; more fall back to gRPC")
    p.add_argument("--triton-shm-idle-release", type=float,
                   default=_env("TRITON_SHM_IDLE_RELEASE", d.triton_shm_idle_release_s),
                   help="seconds a shared-memory slot stays free before its pages go back to the system (0: never)")
    p.add_argument("--max-message-bytes", type=int, default=_env("MAX_MESSAGE_BYTES", d.max_message_bytes))
    p.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", d.max_image_pixels))
    p.add_argument("--shutdown-grace", type=float, default=_env("SHUTDOWN_GRACE", d.shutdown_grace_s),
                   help="seconds in-flight RPCs get to finish on shutdown")
    p.add_argument("--max-tracking-sessions", type=int, default=_env("MAX_TRACKING_SESSIONS", d.max_tracking_sessions))
    p.add_argument("--max-objects-per-session", type=int, default=_env("MAX_OBJECTS_PER_SESSION", d.max_objects_per_session))
    p.add_argument("--session-idle-ttl", type=float, default=_env("SESSION_IDLE_TTL", d.session_idle_ttl_s),
                   help="seconds a tracking session without a stream is kept for resume")
    p.add_argument("--health-interval", type=float, default=_env("HEALTH_INTERVAL", d.health_interval_s))
    p.add_argument("--result-cache-bytes", type=int, default=_env("RESULT_CACHE_BYTES", d.result_cache_bytes),
                   help="bytes of detection / matting results kept for identical requests (least recently used "
                        "evicted first), in <storage-root>/cache, per replica; 0 disables (FRAMEWISE_RESULT_CACHE_BYTES)")
    p.add_argument("--replica-id", default=_env("REPLICA_ID", d.replica_id),
                   help="this replica's name among those sharing a job store: who holds a job's lease, shown as "
                        "an operation's replica (FRAMEWISE_REPLICA_ID; default: host name and PID)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    p.add_argument("--log-format", choices=("json", "text"), default=_env("LOG_FORMAT", d.log_format))
    _add_job_flags(p, d.jobs)
    _add_transport_flags(p)
    add_auth_flags(p)
    add_quota_flags(p)
    a = p.parse_args(argv)
    if a.job_lease <= 0:
        p.error(f"--job-lease must be > 0 seconds, got {a.job_lease}")
    if a.job_lease_renew is not None and not 0 < a.job_lease_renew < a.job_lease:
        p.error(f"--job-lease-renew must be > 0 and shorter than --job-lease ({a.job_lease} s), got {a.job_lease_renew}")
    if a.max_talk_persons < 1:
        p.error(f"--max-talk-persons must be >= 1, got {a.max_talk_persons}")
    if a.triton_shm_idle_release < 0:
        p.error(f"--triton-shm-idle-release must be >= 0 seconds (0 keeps the pages), got {a.triton_shm_idle_release}")
    if a.result_cache_bytes < 0:
        p.error(f"--result-cache-bytes must be >= 0 (0 disables the cache), got {a.result_cache_bytes}")
    if not 0 <= a.job_worker_nice <= 19:
        p.error(f"--job-worker-nice must be within 0..19 (a child may lower its priority, not raise it), got {a.job_worker_nice}")
    from server.jobs.store.factory import sqlite_path  # server.jobs imports this module

    try:
        sqlite_path(a.job_store)
    except ValueError as exc:
        p.error(f"--job-store: {exc}")
    try:
        tls = tls_settings(a.tls_cert, a.tls_key, a.tls_client_ca, a.tls_client_auth)
    except ValueError as exc:
        p.error(str(exc))
    return ServerConfig(
        listen=a.listen,
        metrics_listen=a.metrics_listen,
        triton_url=a.triton_url or None,
        model_repository=Path(a.model_repository),
        triton_work_dir=Path(a.triton_work_dir),
        triton_ports=TritonPorts(
            grpc=a.triton_grpc_port, http=a.triton_http_port, metrics=a.triton_metrics_port, bind_address=a.triton_bind_address
        ),
        triton_startup_timeout_s=a.triton_startup_timeout,
        triton_timeout_s=a.triton_timeout,
        triton_shm=a.triton_shm,
        triton_shm_slots=a.triton_shm_slots,
        triton_shm_idle_release_s=a.triton_shm_idle_release,
        max_message_bytes=a.max_message_bytes,
        max_image_pixels=a.max_image_pixels,
        shutdown_grace_s=a.shutdown_grace,
        health_interval_s=a.health_interval,
        result_cache_bytes=a.result_cache_bytes,
        max_tracking_sessions=a.max_tracking_sessions,
        max_objects_per_session=a.max_objects_per_session,
        session_idle_ttl_s=a.session_idle_ttl,
        log_level=a.log_level.upper(),
        log_format=a.log_format,
        replica_id=a.replica_id or f"{socket.gethostname()}-{os.getpid()}",
        jobs=_jobs_config(a),
        quotas=quota_config_from_args(p, a),
        auth=auth_config_from_args(a, p.error),
        transport=TransportSettings(tls=tls, allow_unauthenticated_public=a.allow_unauthenticated_public),
    )


def _flag_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _add_transport_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("transport security (TLS, mutual TLS, who may reach the port)")
    g.add_argument("--tls-cert", type=_flag_path, default=_env("TLS_CERT", None),
                   help="PEM certificate chain of the gRPC port (FRAMEWISE_TLS_CERT); with --tls-key, the port speaks TLS only")
    g.add_argument("--tls-key", type=_flag_path, default=_env("TLS_KEY", None),
                   help="PEM private key of --tls-cert (FRAMEWISE_TLS_KEY)")
    g.add_argument("--tls-client-ca", type=_flag_path, default=_env("TLS_CLIENT_CA", None),
                   help="PEM CA bundle that signs client certificates: mutual TLS (FRAMEWISE_TLS_CLIENT_CA); a verified "
                        "certificate's subject CN / SANs identify the client")
    g.add_argument("--tls-client-auth", default=_env("TLS_CLIENT_AUTH", None),
                   help="none or require (FRAMEWISE_TLS_CLIENT_AUTH; default: require when --tls-client-ca is given): "
                        "require refuses the TLS handshake of a client without a certificate signed by --tls-client-ca")
    g.add_argument("--allow-unauthenticated-public", action="store_true",
                   default=_env("ALLOW_UNAUTHENTICATED_PUBLIC", "") in ("1", "true", "yes"),
                   help="let the server listen on a non-loopback address although callers need not authenticate "
                        "(FRAMEWISE_ALLOW_UNAUTHENTICATED_PUBLIC=1): only for a trusted private network or behind a "
                        "proxy that authenticates")


def _add_job_flags(p: argparse.ArgumentParser, d: JobsConfig) -> None:
    g = p.add_argument_group("long-running jobs")
    g.add_argument("--job-store", default=_env("JOB_STORE", d.store),
                   help="where operations and their events live (FRAMEWISE_JOB_STORE): a SQLite file path or "
                        "sqlite:///path, or postgresql://user:password@host:port/database for a store shared by "
                        "replicas")
    g.add_argument("--job-store-sync", choices=("full", "normal"), default=_env("JOB_STORE_SYNC", d.store_sync),
                   help="full (default): every commit is fsynced before its event is published, so what a watcher saw "
                        "survives a power cut; normal: survives kill -9 of the server but not a power cut or kernel "
                        "crash, and skips the fsync that dominates an event's latency on a busy disk")
    g.add_argument("--storage-root", type=Path, default=_env("STORAGE_ROOT", d.storage_root),
                   help="folder of the uploads/processed/videos/temp tiers (FRAMEWISE_STORAGE_ROOT)")
    g.add_argument("--media-root", type=Path, default=_env("MEDIA_ROOT", d.media_root),
                   help="folder SegmentVideo's server_path may read from; unset disables server paths")
    # "worker" names the job worker process (--job-process worker); this is how many jobs run
    # at once in it. --job-workers was its old name and stays accepted.
    g.add_argument("--job-concurrency", "--job-workers", dest="job_concurrency", type=int,
                   default=_env("JOB_CONCURRENCY", _env("JOB_WORKERS", d.concurrency)),
                   help="jobs running at once on this replica (FRAMEWISE_JOB_CONCURRENCY)")
    g.add_argument("--job-process", choices=("worker", "inline"), default=_env("JOB_PROCESS", d.process),
                   help="where jobs run: a child worker process at lower CPU priority (default), or inline in the "
                        "serving process")
    g.add_argument("--job-worker-nice", type=int, default=_env("JOB_WORKER_NICE", d.worker_nice),
                   help="niceness (0-19) of the job worker process: its CPU work yields to the serving process")
    g.add_argument("--max-queued-jobs", type=int, default=_env("MAX_QUEUED_JOBS", d.max_queued),
                   help="jobs waiting beyond this, counted over every replica sharing the job store, are refused "
                        "with RESOURCE_EXHAUSTED")
    g.add_argument("--job-lease", type=float, default=_env("JOB_LEASE", d.lease_s),
                   help="seconds a replica holds a claimed job without renewing; a dead or frozen replica's jobs "
                        "resume on another replica about this long after its last renewal (FRAMEWISE_JOB_LEASE)")
    g.add_argument("--job-lease-renew", type=float, default=_env("JOB_LEASE_RENEW", d.lease_renew_s),
                   help="seconds between lease renewals (default: a third of --job-lease, so two may fail); a "
                        "cancel requested on another replica reaches the job within this at the latest")
    g.add_argument("--job-heartbeat", type=float, default=_env("JOB_HEARTBEAT", d.heartbeat_s),
                   help="seconds between heartbeats on an idle WatchOperation stream")
    g.add_argument("--detection-slots", type=int, default=_env("DETECTION_SLOTS", d.detection_slots))
    g.add_argument("--matting-slots", type=int, default=_env("MATTING_SLOTS", d.matting_slots))
    g.add_argument("--tracking-slots", type=int, default=_env("TRACKING_SLOTS", d.tracking_slots))
    g.add_argument("--job-retry-base", type=float, default=_env("JOB_RETRY_BASE", d.retry_base_s),
                   help="seconds of the first backoff between whole-stage retries (doubles, with jitter)")
    g.add_argument("--max-upload-bytes", type=int, default=_env("MAX_UPLOAD_BYTES", d.max_upload_bytes))
    for tier in ("uploads", "processed", "videos", "temp"):
        g.add_argument(f"--retention-{tier}", type=float, default=_env(f"RETENTION_{tier.upper()}", getattr(d, f"retention_{tier}_s")),
                       help=f"seconds files stay in the {tier} tier")
    g.add_argument("--retention-operations", type=float,
                   default=_env("RETENTION_OPERATIONS", d.retention_operations_s),
                   help="seconds a finished operation (its events, artifacts and their files) is kept after it ended")
    g.add_argument("--cleanup-interval", type=float, default=_env("CLEANUP_INTERVAL", d.cleanup_interval_s))
    g.add_argument("--low-disk-bytes", type=int, default=_env("LOW_DISK_BYTES", d.low_disk_bytes),
                   help="free space under this is reported as low disk (health, metrics)")
    g.add_argument("--disk-check-interval", type=float, default=_env("DISK_CHECK_INTERVAL", d.disk_check_interval_s),
                   help="seconds between free-space checks (low disk turns health NOT_SERVING within this)")
    g.add_argument("--did-url", default=_env("DID_URL", d.did_url), help="D-ID API base URL (FRAMEWISE_DID_URL)")
    g.add_argument("--did-api-key", default=_env("DID_API_KEY", None), help="D-ID key; prefer FRAMEWISE_DID_API_KEY")
    g.add_argument("--did-is-emulator", action="store_true", default=_env("DID_IS_EMULATOR", "") in ("1", "true"),
                   help="the D-ID URL is the local emulator (logged loudly)")
    g.add_argument("--did-timeout", type=float, default=_env("DID_TIMEOUT", d.did_timeout_s))
    g.add_argument("--did-poll-interval", type=float, default=_env("DID_POLL_INTERVAL", d.did_poll_interval_s))
    g.add_argument("--did-wait-timeout", type=float, default=_env("DID_WAIT_TIMEOUT", d.did_wait_timeout_s))
    g.add_argument("--max-talk-persons", type=int, default=_env("MAX_TALK_PERSONS", d.max_talk_persons),
                   help="most persons (so D-ID talks, each billed) one all_persons talking video may make")


def _jobs_config(a: argparse.Namespace) -> JobsConfig:
    return JobsConfig(
        store=str(a.job_store),
        store_sync=a.job_store_sync,
        storage_root=Path(a.storage_root),
        media_root=Path(a.media_root) if a.media_root else None,
        concurrency=a.job_concurrency,
        process=a.job_process,
        worker_nice=a.job_worker_nice,
        max_queued=a.max_queued_jobs,
        heartbeat_s=a.job_heartbeat,
        detection_slots=a.detection_slots,
        matting_slots=a.matting_slots,
        tracking_slots=a.tracking_slots,
        retry_base_s=a.job_retry_base,
        max_upload_bytes=a.max_upload_bytes,
        retention_uploads_s=a.retention_uploads,
        retention_processed_s=a.retention_processed,
        retention_videos_s=a.retention_videos,
        retention_temp_s=a.retention_temp,
        retention_operations_s=a.retention_operations,
        cleanup_interval_s=a.cleanup_interval,
        low_disk_bytes=a.low_disk_bytes,
        disk_check_interval_s=a.disk_check_interval,
        did_url=a.did_url,
        did_api_key=a.did_api_key or None,
        did_is_emulator=bool(a.did_is_emulator),
        did_timeout_s=a.did_timeout,
        did_poll_interval_s=a.did_poll_interval,
        did_wait_timeout_s=a.did_wait_timeout,
        max_talk_persons=a.max_talk_persons,
        lease_s=a.job_lease,
        lease_renew_s=a.job_lease_renew,
    )
