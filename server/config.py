"""Orchestrator settings: command-line flags, each with a FRAMEWISE_* environment fallback."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from server.triton.launcher import TritonPorts

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:50051"
    metrics_listen: str = "0.0.0.0:9091"  # empty: no metrics endpoint
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
    max_message_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    shutdown_grace_s: float = 10.0
    max_tracking_sessions: int = 16
    max_objects_per_session: int = 8
    session_idle_ttl_s: float = 300.0
    health_interval_s: float = 1.0
    log_level: str = "INFO"
    log_format: str = "json"  # or "text"


def _env(name: str, default: object) -> str | None:
    value = os.environ.get(f"FRAMEWISE_{name}")
    return value if value is not None else (None if default is None else str(default))


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m server", description="Framewise gRPC orchestrator")
    p.add_argument("--listen", default=_env("LISTEN", d.listen), help="gRPC address (FRAMEWISE_LISTEN)")
    p.add_argument("--metrics-listen", default=_env("METRICS_LISTEN", d.metrics_listen),
                   help="Prometheus endpoint host:port, empty to disable (FRAMEWISE_METRICS_LISTEN)")
    p.add_argument("--triton-url", default=_env("TRITON_URL", None),
                   help="external Triton gRPC address; unset starts the bundled tritonserver (FRAMEWISE_TRITON_URL)")
    p.add_argument("--model-repository", type=Path, default=_env("MODEL_REPOSITORY", d.model_repository),
                   help="repository for the bundled Triton (FRAMEWISE_MODEL_REPOSITORY)")
    p.add_argument("--triton-work-dir", type=Path, default=_env("TRITON_WORK_DIR", d.triton_work_dir))
    p.add_argument("--triton-grpc-port", type=int, default=_env("TRITON_GRPC_PORT", d.triton_ports.grpc))
    p.add_argument("--triton-http-port", type=int, default=_env("TRITON_HTTP_PORT", d.triton_ports.http))
    p.add_argument("--triton-metrics-port", type=int, default=_env("TRITON_METRICS_PORT", d.triton_ports.metrics))
    p.add_argument("--triton-startup-timeout", type=float, default=_env("TRITON_STARTUP_TIMEOUT", d.triton_startup_timeout_s))
    p.add_argument("--triton-timeout", type=float, default=_env("TRITON_TIMEOUT", d.triton_timeout_s),
                   help="seconds per Triton inference unless the RPC's deadline is sooner")
    p.add_argument("--triton-shm", choices=("auto", "on", "off"), default=_env("TRITON_SHM", d.triton_shm),
                   help="pass tensors to Triton through system shared memory (auto: only for the managed child)")
    p.add_argument("--triton-shm-slots", type=int, default=_env("TRITON_SHM_SLOTS", d.triton_shm_slots),
                   help="concurrent requests per model that use shared memory; more fall back to gRPC")
    p.add_argument("--max-message-bytes", type=int, default=_env("MAX_MESSAGE_BYTES", d.max_message_bytes))
    p.add_argument("--max-image-pixels", type=int, default=_env("MAX_IMAGE_PIXELS", d.max_image_pixels))
    p.add_argument("--shutdown-grace", type=float, default=_env("SHUTDOWN_GRACE", d.shutdown_grace_s),
                   help="seconds in-flight RPCs get to finish on shutdown")
    p.add_argument("--max-tracking-sessions", type=int, default=_env("MAX_TRACKING_SESSIONS", d.max_tracking_sessions))
    p.add_argument("--max-objects-per-session", type=int, default=_env("MAX_OBJECTS_PER_SESSION", d.max_objects_per_session))
    p.add_argument("--session-idle-ttl", type=float, default=_env("SESSION_IDLE_TTL", d.session_idle_ttl_s),
                   help="seconds a tracking session without a stream is kept for resume")
    p.add_argument("--health-interval", type=float, default=_env("HEALTH_INTERVAL", d.health_interval_s))
    p.add_argument("--log-level", default=_env("LOG_LEVEL", d.log_level))
    p.add_argument("--log-format", choices=("json", "text"), default=_env("LOG_FORMAT", d.log_format))
    a = p.parse_args(argv)
    return ServerConfig(
        listen=a.listen,
        metrics_listen=a.metrics_listen,
        triton_url=a.triton_url or None,
        model_repository=Path(a.model_repository),
        triton_work_dir=Path(a.triton_work_dir),
        triton_ports=TritonPorts(grpc=a.triton_grpc_port, http=a.triton_http_port, metrics=a.triton_metrics_port),
        triton_startup_timeout_s=a.triton_startup_timeout,
        triton_timeout_s=a.triton_timeout,
        triton_shm=a.triton_shm,
        triton_shm_slots=a.triton_shm_slots,
        max_message_bytes=a.max_message_bytes,
        max_image_pixels=a.max_image_pixels,
        shutdown_grace_s=a.shutdown_grace,
        health_interval_s=a.health_interval,
        max_tracking_sessions=a.max_tracking_sessions,
        max_objects_per_session=a.max_objects_per_session,
        session_idle_ttl_s=a.session_idle_ttl,
        log_level=a.log_level.upper(),
        log_format=a.log_format,
    )
