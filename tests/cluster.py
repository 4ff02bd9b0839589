"""A real cluster for tests: PostgreSQL, one Triton, N orchestrator replicas, the D-ID emulator
and HAProxy in front, over real sockets.

Use the module-scoped fixture (import it into the test module):

    from tests.cluster import cluster  # noqa: F401 - the fixture

    def test_something(cluster: ClusterHandle) -> None:
        with grpc.insecure_channel(cluster.address) as channel: ...      # through HAProxy
        with grpc.insecure_channel(cluster.replicas[1].address) as ch: ...  # one replica directly
        os.kill(cluster.replicas[0].pid, signal.SIGKILL)

or build one with other replica flags (a short job lease, say) in a module fixture of your own:

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory, triton, postgres_server):
        with running_cluster(tmp_path_factory.mktemp("cluster"), triton.url, postgres_server.url,
                             replicas=3, replica_args=["--job-lease", "2"]) as handle:
            yield handle

The replicas share the session's Triton (tests/conftest.py: the CPU repository with the 256 SAM 2
size), a fresh PostgreSQL schema in the session's server (the job store) and one storage root;
the cluster has its own D-ID emulator, so its request log is the cluster's alone. Replicas are
started the way ``make serve-cluster`` starts them (server/cluster/topology.py), HAProxy with the
configuration it uses (server/cluster/haproxy.py), with health checks every 200 ms here.

Helpers for tests that break things: ``kill(replica, sig)`` (SIGKILL, SIGSTOP, SIGCONT, SIGTERM),
``restart(replica)`` (same id and ports), ``wait_healthy`` / ``wait_lb`` (HAProxy's view of a
replica: "UP" or "DOWN", from its stats CSV), ``replica_answering(channel, session_key)``.

A test that stops the job store gives the cluster a PostgreSQL of its own (stopping the
session's server would break every other test's store), then ``stop_postgres()`` /
``start_postgres()`` (same port and data, everything committed kept):

    with ClusterPostgres() as pg, running_cluster(work_dir, triton.url, pg.url, postgres=pg) as c:
        c.stop_postgres(); ...; c.start_postgres()
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from did_emulator import EmulatorHandle, start_emulator
from framewise.v1 import info_service_pb2, info_service_pb2_grpc
from server.cluster.haproxy import SESSION_HEADER, Backend, HAProxyConfig, find_haproxy
from server.cluster.topology import ReplicaSpec, free_port, plan_replicas, replica_command
from server.pg.local import LocalPostgres
from tests.conftest import ASSETS, DID_API_KEY, REPO, stop_process, wait_until

__all__ = ["ClusterHandle", "ClusterPostgres", "Replica", "cluster", "running_cluster"]

# Fast failure detection in tests (make serve-cluster uses 500 ms).
CHECK_INTERVAL_MS = 200
STARTUP_TIMEOUT_S = 120.0


@dataclass
class Replica:
    spec: ReplicaSpec
    command: list[str]
    log_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def replica_id(self) -> str:
        return self.spec.replica_id

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def metrics_url(self) -> str:
        return f"http://{self.spec.host}:{self.spec.metrics_port}/metrics"

    @property
    def healthz_url(self) -> str:
        return self.spec.healthz_url

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def healthz(self) -> int | None:
        """/healthz's status code (200 serving, 503 not), None when nothing answers."""
        try:
            return httpx.get(self.healthz_url, timeout=1).status_code
        except httpx.HTTPError:
            return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class ClusterPostgres:
    """A PostgreSQL server of the cluster's own that synchronous tests can stop and start again.

    LocalPostgres is asyncio; its server process is watched by the loop that started it, so one
    private loop on one thread (alive as long as this object) starts, stops and restarts it. That
    thread is also the server's parent for PR_SET_PDEATHSIG, so it must outlive the server."""

    def __init__(self, timeout_s: float = 60.0) -> None:
        self._timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cluster-postgres", daemon=True)
        self._server: LocalPostgres | None = None

    def _run(self, coro: Coroutine[object, object, object]) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(self._timeout_s)

    def __enter__(self) -> ClusterPostgres:
        self._thread.start()
        self._server = self._run(self._create())  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._run(self._server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @staticmethod
    async def _create() -> LocalPostgres:
        server = LocalPostgres()  # constructed on the loop that will watch its process
        await server.start()
        return server

    @property
    def url(self) -> str:
        assert self._server is not None
        return self._server.url

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.pid is not None

    def stop(self) -> None:
        """Fast shutdown: every client connection is cut, committed work is kept."""
        assert self._server is not None
        self._run(self._server.stop())

    def start(self) -> None:
        """Starts it again on the same port with the same data; returns once it accepts connections."""
        assert self._server is not None
        self._run(self._server.start())


@dataclass
class ClusterHandle:
    address: str  # HAProxy: what clients use
    replicas: list[Replica]
    emulator: EmulatorHandle
    triton_url: str
    job_store_url: str
    storage_root: Path
    work_dir: Path
    stats_url: str
    haproxy: subprocess.Popen
    postgres: ClusterPostgres | None = None  # when the cluster was given a PostgreSQL of its own
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def emulator_url(self) -> str:
        return self.emulator.url

    @property
    def replica_ids(self) -> list[str]:
        return [r.replica_id for r in self.replicas]

    def replica(self, replica_id: str) -> Replica:
        (found,) = [r for r in self.replicas if r.replica_id == replica_id]
        return found

    def kill(self, replica: Replica, sig: signal.Signals = signal.SIGKILL) -> None:
        os.kill(replica.pid, sig)

    def restart(self, replica: Replica) -> None:
        """Starts a stopped or killed replica again with the same id and ports; waits until healthy."""
        if replica.process is not None and replica.process.poll() is None:
            os.kill(replica.pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
            stop_process(replica.process)
        replica.start()
        self.wait_healthy(replica)

    def wait_healthy(self, replica: Replica, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        def up() -> bool:
            assert replica.process is not None
            if replica.process.poll() is not None:
                raise AssertionError(f"{replica.replica_id} exited ({replica.process.returncode}):\n{replica.log_text()[-4000:]}")
            return replica.healthz() == 200

        wait_until(up, timeout_s, f"{replica.replica_id} to be healthy")

    def stop_postgres(self) -> None:
        """Stops the job store's server (only a cluster given ``postgres=`` can)."""
        assert self.postgres is not None, "running_cluster(..., postgres=ClusterPostgres()) to stop it"
        self.postgres.stop()

    def start_postgres(self) -> None:
        assert self.postgres is not None, "running_cluster(..., postgres=ClusterPostgres()) to start it"
        self.postgres.start()

    def lb_status(self) -> dict[str, str]:
        """HAProxy's view of each replica: "UP", "DOWN" (or "UP 1/2"-style transitions), by id."""
        text = httpx.get(f"{self.stats_url};csv", timeout=2).text.lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "replicas" and row["svname"] in self.replica_ids}

    def wait_lb(self, replica: Replica, status: str, timeout_s: float = 15.0) -> None:
        """Waits until HAProxy reports the replica "UP" or "DOWN"."""
        wait_until(lambda: self.lb_status().get(replica.replica_id) == status, timeout_s, f"HAProxy to see {replica.replica_id} {status}")

    def channel(self, address: str | None = None) -> grpc.Channel:
        """A channel closed with the cluster (to HAProxy unless ``address`` says otherwise)."""
        ch = grpc.insecure_channel(address or self.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self._channels.append(ch)
        return ch

    def stop(self) -> None:
        for ch in self._channels:
            ch.close()
        if self.postgres is not None and not self.postgres.running:
            self.postgres.start()  # a test may have left it stopped: replicas drain against a live store
        for r in self.replicas:
            if r.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signal.SIGCONT)  # a test may have left one stopped
        running = [r.process for r in self.replicas if r.process is not None and r.process.poll() is None]
        for process in running:  # all drain at once
            process.send_signal(signal.SIGTERM)
        for process in running:
            stop_process(process)
        stop_process(self.haproxy, 10)
        self.emulator.stop()


def replica_answering(channel: grpc.Channel, session_key: str | None = None, timeout_s: float = 10) -> str:
    """The replica id GetServerInfo reports through ``channel`` (with ``x-framewise-session`` set
    to ``session_key`` when given)."""
    metadata = None if session_key is None else ((SESSION_HEADER, session_key),)
    info = info_service_pb2_grpc.InfoServiceStub(channel).GetServerInfo(
        info_service_pb2.GetServerInfoRequest(), metadata=metadata, timeout=timeout_s
    )
    return info.replica_id


def create_schema(postgres_url: str) -> str:
    """A fresh schema in the session's PostgreSQL: the cluster's own empty job store."""
    import psycopg

    schema = f"cluster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{postgres_url}?options=-csearch_path%3D{schema}"


def replica_test_args() -> list[str]:
    """What the other server tests run with, so jobs and health react fast."""
    return [
        "--health-interval", "0.2", "--shutdown-grace", "20", "--log-level", "DEBUG", "--result-cache-bytes", "0",
        "--did-poll-interval", "0.05", "--did-timeout", "2", "--job-retry-base", "0.05", "--job-heartbeat", "1",
        "--media-root", str(ASSETS / "videos"),
    ]  # fmt: skip


@contextlib.contextmanager
def running_cluster(
    work_dir: Path,
    triton_url: str,
    postgres_url: str,
    *,
    replicas: int = 3,
    replica_args: list[str] | tuple[str, ...] = (),
    emulator_stage_delay_s: float = 0.05,
    postgres: ClusterPostgres | None = None,
) -> Iterator[ClusterHandle]:
    """Starts the cluster, yields its handle once HAProxy sees every replica UP, stops it all.
    ``postgres``: the server behind ``postgres_url`` when it is the cluster's own (the handle can
    then stop and start it)."""
    job_store = create_schema(postgres_url)
    storage_root = work_dir / "storage"
    storage_root.mkdir(parents=True, exist_ok=True)
    emulator = start_emulator("127.0.0.1", 0, DID_API_KEY, stage_delay_s=emulator_stage_delay_s)
    env = dict(
        os.environ, PYTHONUNBUFFERED="1",
        FRAMEWISE_DID_URL=emulator.url, FRAMEWISE_DID_API_KEY=DID_API_KEY, FRAMEWISE_DID_IS_EMULATOR="1",
    )  # fmt: skip
    members: list[Replica] = []
    for spec in plan_replicas(replicas):
        command = replica_command(
            spec,
            triton_url=triton_url,
            job_store=job_store,
            storage_root=storage_root,
            extra_args=[*replica_test_args(), *replica_args],
            python=sys.executable,
        )
        members.append(Replica(spec, command, work_dir / f"{spec.replica_id}.log", env))
    stats_port = free_port()
    config = HAProxyConfig(
        tuple(Backend(r.replica_id, r.spec.host, r.spec.grpc_port, r.spec.metrics_port) for r in members),
        listen_port=free_port(),
        stats_port=stats_port,
        check_interval_ms=CHECK_INTERVAL_MS,
    )
    config_path = work_dir / "haproxy.cfg"
    config_path.write_text(config.render())
    haproxy: subprocess.Popen | None = None
    handle: ClusterHandle | None = None
    try:
        for r in members:
            r.start()
        with open(work_dir / "haproxy.log", "ab") as log:
            haproxy = subprocess.Popen(
                [str(find_haproxy()), "-db", "-f", str(config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        handle = ClusterHandle(
            address=f"127.0.0.1:{config.listen_port}", replicas=members, emulator=emulator, triton_url=triton_url,
            job_store_url=job_store, storage_root=storage_root, work_dir=work_dir,
            stats_url=f"http://127.0.0.1:{stats_port}/", haproxy=haproxy, postgres=postgres,
        )  # fmt: skip
        for r in members:
            handle.wait_healthy(r)
        for r in members:
            handle.wait_lb(r, "UP")
        yield handle
    finally:
        if handle is not None:
            handle.stop()
        else:
            for r in members:
                if r.process is not None:
                    stop_process(r.process)
            if haproxy is not None:
                stop_process(haproxy, 10)
            emulator.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, triton, postgres_server) -> Iterator[ClusterHandle]:  # noqa: ANN001
    """Three replicas behind HAProxy, for the whole test module."""
    with running_cluster(tmp_path_factory.mktemp("cluster"), triton.url, postgres_server.url, replicas=3) as handle:
        yield handle
