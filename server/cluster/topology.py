"""A one-machine cluster's shape: replica names, ports and command lines (no processes here).

Shared by the launcher (``python -m server.cluster``, ``make serve-cluster``) and the tests'
cluster fixture (tests/cluster.py), so both start replicas the same way.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ReplicaSpec", "free_port", "plan_replicas", "replica_command"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ReplicaSpec:
    """One orchestrator replica: its --replica-id and the two ports it listens on."""

    replica_id: str
    host: str
    grpc_port: int
    metrics_port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def healthz_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/healthz"


def plan_replicas(count: int, *, host: str = "127.0.0.1", grpc_base: int = 0, metrics_base: int = 0) -> list[ReplicaSpec]:
    """``count`` replicas named replica-1..N; ports ``base + i`` (i from 0), or free ports where a
    base is 0."""
    if count < 1:
        raise ValueError(f"a cluster needs at least one replica, got {count}")
    return [
        ReplicaSpec(
            replica_id=f"replica-{i + 1}",
            host=host,
            grpc_port=grpc_base + i if grpc_base else free_port(host),
            metrics_port=metrics_base + i if metrics_base else free_port(host),
        )
        for i in range(count)
    ]


def replica_command(
    spec: ReplicaSpec,
    *,
    triton_url: str,
    job_store: str,
    storage_root: Path,
    extra_args: tuple[str, ...] | list[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """``python -m server`` for one replica: the shared Triton, the shared job store and storage
    root, its own name and ports. ``extra_args`` come last (argparse: the last one wins). The
    D-ID settings travel in the environment (FRAMEWISE_DID_*), keeping the key off the command
    line that ``ps`` shows."""
    return [
        python, "-m", "server",
        "--replica-id", spec.replica_id,
        "--listen", spec.address,
        "--metrics-listen", f"{spec.host}:{spec.metrics_port}",
        "--triton-url", triton_url,
        "--job-store", job_store,
        "--storage-root", str(storage_root),
        *extra_args,
    ]  # fmt: skip
