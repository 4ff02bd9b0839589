"""Starts a whole cluster on one machine (``make serve-cluster``) and stops everything it started.

What it starts, in order (each only when not given from outside):
    1. PostgreSQL (server/pg): the job store every replica shares (``--job-store`` given: used).
    2. One Triton (the managed launcher, server/triton/launcher.py) for all replicas
       (``--triton-url`` given: used).
    3. The D-ID emulator, unless FRAMEWISE_DID_API_KEY is set (then the replicas use D-ID).
    4. N orchestrator replicas (``python -m server`` with --replica-id replica-N, the shared
       --triton-url, --job-store and --storage-root), each with its job worker; waits until every
       one answers /healthz with 200.
    5. HAProxy on the public port (server/cluster/haproxy.py).

Every child is tied to this process (PR_SET_PDEATHSIG): if the launcher dies, even by kill -9,
they get SIGTERM. SIGINT/SIGTERM stops them in reverse order: the replicas first (they drain:
NOT_SERVING, in-flight calls finish, running jobs stay in the store for the next start), then
HAProxy, the emulator, Triton, PostgreSQL. A replica that exits on its own is started again
after a pause (like a process supervisor), unless ``restart_replicas`` is off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.aio import cancel_and_wait
from server.cluster.haproxy import Backend, HAProxy, HAProxyConfig, write_frontend_pem
from server.cluster.topology import ReplicaSpec, free_port, plan_replicas, replica_command
from server.processes import child_setup, terminate

__all__ = ["Cluster", "ClusterSettings"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EMULATOR_API_KEY = "local-emulator"


@dataclass(frozen=True)
class ClusterSettings:
    replicas: int = 3
    host: str = "127.0.0.1"
    # The load balancer's port: the one address clients use.
    port: int = 50051
    # Replica N listens on grpc_base + N - 1 and metrics_base + N - 1 (0: free ports).
    grpc_base: int = 50061
    metrics_base: int = 9101
    stats_port: int | None = 8404
    work_dir: Path = REPO_ROOT / ".cache" / "cluster"
    model_repository: Path = REPO_ROOT / ".cache" / "model_repository_cpu"
    # Given: used as they are (nothing of that kind is started).
    triton_url: str | None = None
    job_store: str | None = None
    # Default: work_dir / "storage" (one folder every replica uses).
    storage_root: Path | None = None
    emulator_port: int = 8081
    replica_args: tuple[str, ...] = ()
    restart_replicas: bool = True
    # TLS for clients, terminated at HAProxy (--tls-cert / --tls-key): the replicas behind it
    # listen in plaintext on `host` (loopback by default), which only this machine reaches.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    startup_timeout_s: float = 180.0
    python: str = sys.executable


@dataclass
class _Replica:
    spec: ReplicaSpec
    command: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    supervisor: asyncio.Task[None] | None = None
    restarts: int = 0


@dataclass
class Cluster:
    settings: ClusterSettings
    replicas: list[_Replica] = field(default_factory=list)
    triton_url: str = ""
    job_store: str = ""
    did_url: str = ""
    _postgres: Any = None  # server.pg.LocalPostgres, imported lazily (psycopg)
    _triton: Any = None  # ManagedTriton
    _emulator: asyncio.subprocess.Process | None = None
    _haproxy: HAProxy | None = None
    _env: dict[str, str] = field(default_factory=dict)
    _stopping: bool = False

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    @property
    def storage_root(self) -> Path:
        return self.settings.storage_root or self.settings.work_dir / "storage"

    async def start(self) -> None:
        s = self.settings
        s.work_dir.mkdir(parents=True, exist_ok=True)
        self.storage_root.mkdir(parents=True, exist_ok=True)
        try:
            await self._start_postgres()
            await self._start_triton()
            await self._start_did()
            await self._start_replicas()
            tls_pem = None
            if s.tls_cert is not None and s.tls_key is not None:
                tls_pem = write_frontend_pem(s.tls_cert, s.tls_key, s.work_dir / "haproxy" / "frontend.pem")
            config = HAProxyConfig(
                tuple(Backend(r.spec.replica_id, r.spec.host, r.spec.grpc_port, r.spec.metrics_port) for r in self.replicas),
                listen_host=s.host,
                listen_port=s.port,
                stats_port=s.stats_port,
                tls_pem=tls_pem,
            )
            self._haproxy = HAProxy(config, s.work_dir / "haproxy")
            await self._haproxy.start()
        except BaseException:
            await self.stop()
            raise

    async def _start_postgres(self) -> None:
        if self.settings.job_store:
            self.job_store = self.settings.job_store
            return
        from server.pg import LocalPostgres

        # Kept in the work folder: operations survive a restart of the cluster.
        self._postgres = LocalPostgres(self.settings.work_dir / "postgres")
        self.job_store = await self._postgres.start()

    async def _start_triton(self) -> None:
        if self.settings.triton_url:
            self.triton_url = self.settings.triton_url
            return
        from server.triton.launcher import ManagedTriton, TritonPorts

        self._triton = ManagedTriton(
            self.settings.model_repository,
            self.settings.work_dir / "triton",
            TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port()),
            startup_timeout_s=self.settings.startup_timeout_s,
        )
        await self._triton.start()
        self.triton_url = self._triton.url

    async def _start_did(self) -> None:
        self._env = dict(os.environ, PYTHONUNBUFFERED="1")
        # TLS ends at HAProxy, which speaks plaintext h2 to the replicas: a TLS setting in the
        # environment is HAProxy's (settings.tls_cert), never a replica's.
        for name in ("FRAMEWISE_TLS_CERT", "FRAMEWISE_TLS_KEY", "FRAMEWISE_TLS_CLIENT_CA", "FRAMEWISE_TLS_CLIENT_AUTH"):
            self._env.pop(name, None)
        if os.environ.get("FRAMEWISE_DID_API_KEY"):
            self.did_url = os.environ.get("FRAMEWISE_DID_URL", "https://api.d-id.com")
            return
        port = self.settings.emulator_port or free_port()
        log.warning(
            "FRAMEWISE_DID_API_KEY is not set: starting the LOCAL D-ID EMULATOR; talking videos will NOT come from D-ID",
            extra={"port": port},
        )
        with open(self.settings.work_dir / "did-emulator.log", "ab") as out:
            self._emulator = await asyncio.create_subprocess_exec(
                self.settings.python, "-m", "did_emulator", "--host", self.settings.host, "--port", str(port),
                "--api-key", EMULATOR_API_KEY, cwd=REPO_ROOT, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT, preexec_fn=child_setup(signal.SIGTERM),
            )  # fmt: skip
        self.did_url = f"http://{self.settings.host}:{port}"
        self._env.update(
            FRAMEWISE_DID_URL=self.did_url, FRAMEWISE_DID_API_KEY=EMULATOR_API_KEY, FRAMEWISE_DID_IS_EMULATOR="1"
        )
        await _wait_port(self.settings.host, port, 30.0, lambda: self._emulator, "the D-ID emulator")

    async def _start_replicas(self) -> None:
        s = self.settings
        specs = plan_replicas(s.replicas, host=s.host, grpc_base=s.grpc_base, metrics_base=s.metrics_base)
        for spec in specs:
            command = replica_command(
                spec,
                triton_url=self.triton_url,
                job_store=self.job_store,
                storage_root=self.storage_root,
                extra_args=s.replica_args,
                python=s.python,
            )
            replica = _Replica(spec, command, s.work_dir / f"{spec.replica_id}.log")
            self.replicas.append(replica)
            await self._spawn(replica)
        async with httpx.AsyncClient(timeout=2.0) as http:
            await asyncio.gather(*(self._wait_healthy(http, r) for r in self.replicas))
        if s.restart_replicas:
            for replica in self.replicas:
                replica.supervisor = asyncio.create_task(self._supervise(replica), name=f"supervise-{replica.spec.replica_id}")

    async def _spawn(self, replica: _Replica) -> None:
        with open(replica.log_path, "ab") as out:
            replica.process = await asyncio.create_subprocess_exec(
                *replica.command, cwd=REPO_ROOT, env=self._env, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT, preexec_fn=child_setup(signal.SIGTERM),
            )  # fmt: skip
        log.info("replica started", extra={"replica": replica.spec.replica_id, "pid": replica.process.pid})

    async def _wait_healthy(self, http: httpx.AsyncClient, replica: _Replica) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        while True:
            process = replica.process
            if process is None or process.returncode is not None:
                raise RuntimeError(
                    f"{replica.spec.replica_id} exited while starting; see {replica.log_path}:\n{_tail(replica.log_path)}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(replica.spec.healthz_url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{replica.spec.replica_id} not healthy within {self.settings.startup_timeout_s} s")
            await asyncio.sleep(0.2)

    async def _supervise(self, replica: _Replica) -> None:
        while not self._stopping:
            assert replica.process is not None
            code = await replica.process.wait()
            if self._stopping:
                return
            log.error("replica exited; starting it again", extra={"replica": replica.spec.replica_id, "exit_code": code})
            await asyncio.sleep(1.0)
            replica.restarts += 1
            await self._spawn(replica)

    def describe(self) -> dict[str, Any]:
        """What a user (or a test) needs to reach each part."""
        return {
            "address": self.address,
            "tls": self.settings.tls_cert is not None,
            "stats": None if self.settings.stats_port is None else f"http://{self.settings.host}:{self.settings.stats_port}/",
            "triton_url": self.triton_url,
            "did_url": self.did_url,
            "storage_root": str(self.storage_root),
            "replicas": [
                {
                    "replica_id": r.spec.replica_id,
                    "address": r.spec.address,
                    "healthz": r.spec.healthz_url,
                    "pid": None if r.process is None else r.process.pid,
                    "log": str(r.log_path),
                }
                for r in self.replicas
            ],
        }

    async def stop(self) -> None:
        self._stopping = True
        for replica in self.replicas:
            await cancel_and_wait(replica.supervisor)
        # Replicas first: they drain (NOT_SERVING, in-flight calls finish) while the rest is up.
        await asyncio.gather(*(terminate(r.process, 60.0, r.spec.replica_id) for r in self.replicas))
        if self._haproxy is not None:
            await self._haproxy.stop()
        await terminate(self._emulator, 10.0, "the D-ID emulator")
        if self._triton is not None:
            await self._triton.stop()
        if self._postgres is not None:
            await self._postgres.stop()


async def _wait_port(host: str, port: int, timeout_s: float, process: Any, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        p = process()
        if p is not None and p.returncode is not None:
            raise RuntimeError(f"{what} exited with {p.returncode}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout_s} s") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(no log: {exc})"
