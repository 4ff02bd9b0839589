"""Session fixtures: a real Triton process and the real orchestrator, over real sockets.

Triton is started here (not by the orchestrator) so that tests can stop and restart it and
watch the orchestrator react; the orchestrator's own managed-Triton mode is tested separately
in test_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server.processes import no_grpc_fork_handlers  # no gRPC in it

# Before gRPC loads, as `python -m server` does: tests start Triton in this process with
# ManagedTriton (a preexec_fn, so fork), and with gRPC's fork handlers on, a child forked while
# this process has gRPC calls in flight can die before exec (server/processes.py).
no_grpc_fork_handlers()

import grpc  # noqa: E402
import httpx  # noqa: E402
import pytest
from google.longrunning import operations_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from did_emulator import EmulatorHandle, start_emulator
from engines.cpu_repository import build_cpu_repository
from framewise.v1 import info_service_pb2, info_service_pb2_grpc, jobs_service_pb2_grpc
from server.triton.launcher import ManagedTriton, TritonPorts, reclaim_backend_regions


# Test ids that failed, printed once more after pytest's last line (pytest_unconfigure runs after
# it): CI shows the end of the output, and on CI pytest's short summary prints each failure's
# whole message, which can push the failing test's id out of view.
_FAILED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _FAILED.append(report.nodeid if report.when == "call" else f"{report.nodeid} ({report.when})")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _FAILED:
        print(f"\nfailed ({len(_FAILED)}): " + "  ".join(_FAILED), flush=True)


REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
YOLO_ONNX = ASSETS / "models" / "yolov8n_int8.onnx"

# Limits the test orchestrator runs with, so the limit tests stay small and fast.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_IMAGE_PIXELS = 3_000_000
# The test Triton runs on this host, so the shared orchestrator passes tensors through shared
# memory; with only 4 slots, concurrent tests also exercise the gRPC fallback.
SHARED_MEMORY_ARGS = ["--triton-shm", "on", "--triton-shm-slots", "4"]
# SAM 2 stand-ins at a small model size keep the tracking tests fast; the benchmark uses 1024.
SAM2_TEST_IMAGE_SIZE = 256
# The matting model is the real U^2-Netp: its size is its own (320), fixed by its weights.
MATTING_IMAGE_SIZE = 320
SESSION_IDLE_TTL_S = 3.0
DID_API_KEY = "test-did-key"
MAX_TRACKING_SESSIONS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def bad_request_fields(error: grpc.RpcError) -> list[str] | None:
    """The fields the google.rpc.BadRequest details of a failed call name (AIP-193), in order;
    None when its trailers carry no google.rpc.Status at all."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


def quota_failure(status) -> tuple[list[str], float | None]:  # noqa: ANN001 - a google.rpc.Status
    """The google.rpc.QuotaFailure subjects and the RetryInfo delay (seconds; None without one)
    of a refusal's status (``rpc_status.from_call(error)``, or ``QuotaExceeded.to_status()``)."""
    subjects: list[str] = []
    delay = None
    for detail in status.details:
        failure, retry = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
        if detail.Unpack(failure):
            subjects += [v.subject for v in failure.violations]
        elif detail.Unpack(retry):
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return subjects, delay


def quota_details(error: grpc.RpcError) -> tuple[list[str], float | None]:
    """quota_failure of a refused call."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status in the trailers of {error.code()}: {error.details()}"
    return quota_failure(status)


def network_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def health_status(channel: grpc.Channel, service: str = "") -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return None


@dataclass
class TritonProcess:
    """tritonserver started by the tests with the launcher's own command line."""

    repository: Path
    work_dir: Path
    ports: TritonPorts
    process: subprocess.Popen | None = None
    # More tritonserver flags (model control for the tests that reload a model).
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def start(self, attempts: int = 3) -> None:
        """Like ManagedTriton.start: a start that crashes (a signal before ready) is tried again."""
        launcher = ManagedTriton(self.repository, self.work_dir, self.ports, restart_on_exit=False, extra_args=self.extra_args)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        reclaim_backend_regions()  # as ManagedTriton does: what Tritons killed by earlier tests left
        for attempt in range(1, attempts + 1):
            log = open(self.work_dir / "tritonserver.log", "ab")  # noqa: SIM115 - lives with the process
            self.process = subprocess.Popen(
                launcher.command(), stdout=log, stderr=subprocess.STDOUT, env=launcher.environment()
            )
            try:
                wait_until(self.ready, 120, "Triton to become ready")
                return
            except AssertionError:
                if attempt == attempts or self.process.returncode is None or self.process.returncode >= 0:
                    raise

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"tritonserver exited with {self.process.returncode}; see {self.work_dir}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.ports.http}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Orchestrator:
    address: str
    metrics_url: str
    process: subprocess.Popen
    log_path: Path
    # The API key its callers send (the session `orchestrator` requires one); None: the server
    # was started without authentication.
    api_key: str | None = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict]:
        """The JSON log records written so far. The text after the last newline is left out: the server may be
        in the middle of writing that record, and a reader can see a write cut at a page boundary."""
        text = self.log_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


def start_orchestrator(tmp: Path, extra_args: list[str], name: str = "orchestrator") -> Orchestrator:
    port, metrics_port = free_port(), free_port()
    log_path = tmp / f"{name}.log"
    command = [
        sys.executable, "-m", "server",
        "--listen", f"127.0.0.1:{port}",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--health-interval", "0.2",
        "--max-message-bytes", str(MAX_MESSAGE_BYTES),
        "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        "--shutdown-grace", "20",
        "--log-level", "DEBUG",
        # Every orchestrator gets its own job store and storage folder (extra_args may override).
        "--job-store", str(tmp / f"{name}-jobs.sqlite3"),
        "--storage-root", str(tmp / f"{name}-storage"),
        # No result cache unless a test asks for one (tests/e2e/test_result_cache_server.py): the
        # other tests send the same image again and count what Triton ran for it.
        "--result-cache-bytes", "0",
        *extra_args,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Orchestrator(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", process, log_path)


def stop_process(process: subprocess.Popen, timeout_s: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def serves(channel: grpc.Channel) -> bool:
    return health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def serving_orchestrator(
    tmp: Path,
    extra_args: list[str],
    name: str = "orchestrator",
    ready: Callable[[grpc.Channel], bool] = serves,
    timeout_s: float = 60,
) -> Orchestrator:
    """start_orchestrator, then wait until ``ready(channel)`` (default: overall health SERVING).
    One that never gets there is stopped, and the tail of its log is the failure: without it a
    start-up error reads as a bare timeout."""
    orch = start_orchestrator(tmp, extra_args, name)

    def up(channel: grpc.Channel) -> bool:
        if orch.process.poll() is not None:  # exited: no reason to wait out the timeout
            raise AssertionError("exited")
        return ready(channel)

    try:
        with grpc.insecure_channel(orch.address) as channel:
            wait_until(lambda: up(channel), timeout_s, f"the {name} to be ready")
    except AssertionError:
        stop_process(orch.process)
        raise AssertionError(
            f"{name} never got ready (exit code {orch.process.returncode}); log:\n{orch.log_text()[-4000:]}"
        ) from None
    return orch


@pytest.fixture(scope="session")
def assets() -> Path:
    if not YOLO_ONNX.exists():
        pytest.fail(f"shared assets missing: {YOLO_ONNX} (the tests need ../shared beside the checkout)")
    return ASSETS


@pytest.fixture(scope="session")
def cpu_repository(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Path:
    return build_cpu_repository(
        tmp_path_factory.mktemp("repo") / "model_repository_cpu",
        YOLO_ONNX,
        sam2_image_size=SAM2_TEST_IMAGE_SIZE,
    )


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory, cpu_repository: Path) -> Iterator[TritonProcess]:
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
    process = TritonProcess(cpu_repository, tmp_path_factory.mktemp("triton"), ports)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def did_emulator() -> Iterator[EmulatorHandle]:
    """The project's D-ID emulator (a real HTTP server) standing in for api.d-id.com."""
    handle = start_emulator("127.0.0.1", 0, DID_API_KEY, stage_delay_s=0.05)
    yield handle
    handle.stop()


def job_args(did: EmulatorHandle) -> list[str]:
    """Job settings that keep the job tests fast: quick retries, polls and heartbeats."""
    return [
        "--did-url", did.url, "--did-api-key", DID_API_KEY, "--did-is-emulator",
        "--did-poll-interval", "0.05", "--did-timeout", "2", "--job-retry-base", "0.05", "--job-heartbeat", "1",
        "--media-root", str(ASSETS / "videos"),
    ]  # fmt: skip


# The tenant the shared end-to-end fixtures run as: the session orchestrator requires
# authentication (as a production server does) and its callers send an API key of this tenant,
# made by `framewise admin keys create` in the server's job store.
E2E_TENANT = "e2e"


def create_api_key(store: Path, tenant: str, *scopes: str) -> str:
    """A new API key of ``tenant`` in the job store ``store``, made the way an operator makes
    one: ``framewise admin keys create --tenant NAME --json`` (default scopes: all but admin)."""
    command = [sys.executable, "-m", "clients.cli", "admin", "keys", "create", "--tenant", tenant, "--job-store", str(store), "--json"]
    command += [a for scope in scopes for a in ("--scope", scope)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"framewise admin keys create exited {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout)["key"]


def media_root_for(root: Path, tenant: str) -> Path:
    """``root`` holding the shared test videos under ``<root>/<tenant>/``: an authenticated
    tenant's server_path resolves there (copies, since a symlink out of the root is refused)."""
    folder = root / tenant
    folder.mkdir(parents=True, exist_ok=True)
    for video in (ASSETS / "videos").iterdir():
        if not (folder / video.name).exists():
            (folder / video.name).write_bytes(video.read_bytes())
    return root


class BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call of a (synchronous) channel, whatever
    its kind, unless the call brings its own ``authorization``."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or ())
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(self._header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:  # noqa: ANN001
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


@pytest.fixture(scope="session")
def orchestrator(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess, did_emulator: EmulatorHandle
) -> Iterator[Orchestrator]:
    """The shared orchestrator, authentication required: its callers (the `channel` fixture,
    the CLI through FRAMEWISE_API_KEY, set for the session) send a key of tenant E2E_TENANT."""
    tmp = tmp_path_factory.mktemp("orchestrator")
    store = tmp / "orchestrator-jobs.sqlite3"
    key = create_api_key(store, E2E_TENANT)
    orch = serving_orchestrator(
        tmp,
        ["--triton-url", triton.url, *SHARED_MEMORY_ARGS, "--session-idle-ttl", str(SESSION_IDLE_TTL_S),
         "--max-tracking-sessions", str(MAX_TRACKING_SESSIONS), *job_args(did_emulator),
         "--job-store", str(store), "--media-root", str(media_root_for(tmp / "media", E2E_TENANT)), "--auth", "required",
         # One tenant drives this whole server, and test_tracking fills its global session bound:
         # the tenant's quota sits above that bound, because a kept session's quota slot is freed
         # at the slot renewal after it expired (--quota-session-renew), so slots of sessions the
         # registry already dropped can still count. Quotas: tests/e2e/test_quota_enforcement.py.
         "--quota-sessions", str(2 * MAX_TRACKING_SESSIONS)],
    )  # fmt: skip
    orch.api_key = key
    with grpc.insecure_channel(orch.address) as plain:  # it really requires a credential
        try:
            info_service_pb2_grpc.InfoServiceStub(plain).GetServerInfo(info_service_pb2.GetServerInfoRequest(), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
        else:
            stop_process(orch.process)
            raise AssertionError("the session orchestrator answered a call without credentials")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FRAMEWISE_API_KEY", key)
        yield orch
    stop_process(orch.process)


@pytest.fixture(scope="session")
def channel(orchestrator: Orchestrator) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        orchestrator.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as ch:
        yield grpc.intercept_channel(ch, BearerInterceptor(orchestrator.api_key)) if orchestrator.api_key else ch


@pytest.fixture
def jobs(channel: grpc.Channel) -> jobs_service_pb2_grpc.JobServiceStub:
    return jobs_service_pb2_grpc.JobServiceStub(channel)


@pytest.fixture
def operations(channel: grpc.Channel) -> operations_pb2_grpc.OperationsStub:
    return operations_pb2_grpc.OperationsStub(channel)


@pytest.fixture
def fresh_emulator(did_emulator: EmulatorHandle) -> EmulatorHandle:
    """The session's D-ID emulator with no fault or request log left by an earlier test (job test
    modules use it for every test: ``pytestmark = pytest.mark.usefixtures("fresh_emulator")``)."""
    httpx.post(f"{did_emulator.url}/_emulator/reset", timeout=5).raise_for_status()
    return did_emulator


def child_pids(pid: int, command_part: str) -> list[int]:
    """Live children of ``pid`` whose command line contains ``command_part``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Fields after the ")" that closes the command name: state, ppid, ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and command_part in cmdline:
            found.append(int(entry.name))
    return found


def niceness(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[16])


def pid_alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


JOB_WORKER = "server.app_worker"


# -- PostgreSQL -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def postgres_server():  # noqa: ANN201 - AsyncIterator[LocalPostgres]
    """A real PostgreSQL server for the session (Debian's binaries, `make pg-deps`), run by the
    project's launcher as an unprivileged account, on 127.0.0.1 and a free port."""
    from server.pg.local import LocalPostgres

    server = LocalPostgres()
    await server.start()
    yield server
    await server.close()


async def fresh_postgres_schema(server) -> tuple[str, str]:  # noqa: ANN001 - LocalPostgres
    """A new empty schema in the session's server: ``(url, schema)``, the URL's search_path set to
    it, so each test's store starts from an empty database (and migrates it) without the cost of
    CREATE DATABASE."""
    import uuid

    import psycopg

    schema = f"test_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{server.url}?options=-csearch_path%3D{schema}", schema


async def drop_postgres_schema(server, schema: str) -> None:  # noqa: ANN001 - LocalPostgres
    import psycopg

    async with await psycopg.AsyncConnection.connect(server.url, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
