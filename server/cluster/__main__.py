"""``python -m server.cluster [--replicas N]``: a whole cluster on this machine until Ctrl-C.

PostgreSQL, one Triton, the D-ID emulator (unless FRAMEWISE_DID_API_KEY is set), N orchestrator
replicas and HAProxy on port 50051 (``make serve-cluster REPLICAS=3``). Ctrl-C or SIGTERM stops
everything it started.
"""

from __future__ import annotations

from server.processes import no_grpc_fork_handlers

no_grpc_fork_handlers()  # before gRPC is imported (tritonclient): children start with a preexec_fn

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from server.cluster.launcher import Cluster, ClusterSettings  # noqa: E402
from server.logging_setup import configure_logging  # noqa: E402


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "")
    return Path(value) if value else None


def parse_args(argv: list[str] | None = None) -> tuple[ClusterSettings, Path | None]:
    d = ClusterSettings()
    p = argparse.ArgumentParser(prog="python -m server.cluster", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=d.replicas, help="orchestrator replicas (default 3)")
    p.add_argument("--host", default=d.host, help="interface every part listens on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=d.port, help="the load balancer's gRPC port (default 50051)")
    p.add_argument("--grpc-base", type=int, default=d.grpc_base,
                   help="replica N listens on this port + N - 1 (default 50061; 0: free ports)")
    p.add_argument("--metrics-base", type=int, default=d.metrics_base,
                   help="replica N's metrics and /healthz on this port + N - 1 (default 9101; 0: free ports)")
    p.add_argument("--stats-port", type=int, default=d.stats_port, help="HAProxy's stats page (default 8404; 0: none)")
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="logs, PostgreSQL's data, Triton's work folder")
    p.add_argument("--model-repository", type=Path, default=d.model_repository, help="for the Triton started here")
    p.add_argument("--triton-url", default=None, help="use this Triton instead of starting one")
    p.add_argument("--job-store", default=None, help="use this postgresql:// store instead of starting PostgreSQL")
    p.add_argument("--storage-root", type=Path, default=None, help="the storage root every replica shares")
    p.add_argument("--emulator-port", type=int, default=d.emulator_port, help="the D-ID emulator's port (default 8081)")
    p.add_argument("--no-restart", action="store_true", help="leave a replica that exits stopped")
    p.add_argument("--state-file", type=Path, default=None, help="write the cluster's addresses and pids here (JSON)")
    p.add_argument("--tls-cert", type=Path, default=_env_path("FRAMEWISE_TLS_CERT"),
                   help="PEM certificate chain for clients; TLS terminates at HAProxy, the replicas behind it stay "
                        "plaintext on --host (env FRAMEWISE_TLS_CERT)")
    p.add_argument("--tls-key", type=Path, default=_env_path("FRAMEWISE_TLS_KEY"),
                   help="PEM private key of --tls-cert (env FRAMEWISE_TLS_KEY)")
    p.add_argument("replica_args", nargs=argparse.REMAINDER,
                   help="after --: more `python -m server` flags for every replica")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error(f"--replicas must be >= 1, got {a.replicas}")
    if (a.tls_cert is None) != (a.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    extra = [x for x in a.replica_args if x != "--"] if a.replica_args[:1] == ["--"] else a.replica_args
    settings = ClusterSettings(
        replicas=a.replicas, host=a.host, port=a.port, grpc_base=a.grpc_base, metrics_base=a.metrics_base,
        stats_port=a.stats_port or None, work_dir=a.work_dir, model_repository=a.model_repository,
        triton_url=a.triton_url, job_store=a.job_store, storage_root=a.storage_root,
        emulator_port=a.emulator_port, replica_args=tuple(extra), restart_replicas=not a.no_restart,
        tls_cert=a.tls_cert, tls_key=a.tls_key,
    )  # fmt: skip
    return settings, a.state_file


async def run(settings: ClusterSettings, state_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(settings)
    starting = asyncio.create_task(cluster.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # Ctrl-C while starting: Cluster.start stops what it started
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return
    starting.result()
    described = cluster.describe()
    if state_file is not None:
        state_file.write_text(json.dumps(described, indent=2))
    print(f"framewise cluster serving on {cluster.address} ({len(cluster.replicas)} replicas); Ctrl-C stops it", flush=True)
    print(json.dumps(described, indent=2), flush=True)
    await stopped
    print("stopping the cluster", flush=True)
    await cluster.stop()


def main(argv: list[str] | None = None) -> int:
    settings, state_file = parse_args(argv)
    configure_logging("INFO", "text")
    # One line per readiness probe would bury what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        asyncio.run(run(settings, state_file))
    except (RuntimeError, OSError) as exc:
        logging.getLogger("server.cluster").error("cluster failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
