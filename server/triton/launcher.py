"""Run the `tritonserver` binary shipped in the nvidia-pytriton wheel as a supervised child.

The embedded CPU default: the orchestrator starts Triton with the generated CPU model
repository, waits until it is ready, restarts it if it dies, and stops it on shutdown. In
production the orchestrator connects to an external Triton instead and none of this runs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc.aio as triton_aio

from server.aio import cancel_and_wait
from server.processes import child_setup, terminate
from server.triton.shm import SHM_DIR

log = logging.getLogger(__name__)


class TritonStartError(RuntimeError):
    """Triton did not come up. ``crashed``: the process died of a signal during startup (an
    abort or a segfault inside Triton, which another start may not repeat), as opposed to an
    error exit (a broken repository or model: the same error again) or a timeout."""

    def __init__(self, message: str, *, crashed: bool = False) -> None:
        super().__init__(message)
        self.crashed = crashed


# The python backend's shared-memory regions (one per model instance, for the requests it hands its
# stub) carry this prefix in a Triton we start, so ours can be told from other Tritons' on the
# host. Triton unlinks them when it stops; a Triton that dies (SIGKILL, the OOM killer) leaves them
# in /dev/shm, 16 MiB or more each, holding memory until someone unlinks them: the next start does
# (reclaim_backend_regions).
BACKEND_REGION_PREFIX = "framewise_triton_pb_"
# A region this young may belong to a Triton that created it and has not mapped it yet.
BACKEND_REGION_MIN_AGE_S = 60.0

# Triton's own endpoints have no authentication at all (anyone reaching its HTTP or gRPC port can
# run models, list and unregister the orchestrator's shared-memory regions, or unload models), so
# the managed Triton listens on loopback unless told otherwise (--triton-bind-address, for a
# private network only).
DEFAULT_TRITON_BIND_ADDRESS = "127.0.0.1"


@dataclass(frozen=True)
class TritonPorts:
    grpc: int = 8001
    http: int = 8000
    metrics: int = 8002
    # The address all three bind to (tritonserver's --http-address, --grpc-address and
    # --metrics-address; Triton's own default is 0.0.0.0).
    bind_address: str = DEFAULT_TRITON_BIND_ADDRESS

    @property
    def connect_host(self) -> str:
        """Where this machine reaches them: the bind address, or loopback when it is every interface."""
        host = self.bind_address.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class TritonDistribution:
    """Where the wheel keeps the server binary, the python backend and its shared libraries."""

    binary: Path
    python_backend: Path
    stub: Path
    libs: Path

    @classmethod
    def from_pytriton(cls) -> TritonDistribution:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise TritonStartError(
                "the nvidia-pytriton wheel is not installed, so there is no tritonserver binary to start; "
                "run `make install`, or pass --triton-url to use an external Triton"
            )
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        dist = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=root.parent.parent / "nvidia_pytriton.libs",
        )
        for path in (dist.binary, dist.python_backend, dist.stub):
            if not path.exists():
                raise TritonStartError(f"nvidia-pytriton is incomplete: {path} is missing (Python {version})")
        return dist


def prepare_backend_directory(dist: TritonDistribution, target: Path) -> Path:
    """A backend directory holding the python backend with the stub for this Python.

    The wheel keeps one stub per Python version apart from the backend; Triton looks for the
    stub next to libtriton_python.so, so the two are put together here.
    """
    python_dir = target / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for source in (dist.python_backend / "libtriton_python.so", dist.python_backend / "triton_python_backend_utils.py", dist.stub):
        destination = python_dir / source.name
        if not destination.exists() or destination.stat().st_size != source.stat().st_size:
            shutil.copy2(source, destination)
    return target


# glibc's tunable that backs malloc's large blocks with transparent huge pages (glibc >= 2.35;
# older versions ignore it, as does a kernel with THP "never").
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


# Where the model instances of one server share files (engines/python_backend/onnx_model.py).
RUN_DIR_ENV = "FRAMEWISE_TRITON_RUN_DIR"


def child_environment(dist: TritonDistribution) -> dict[str, str]:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["GLIBC_TUNABLES"] = with_huge_pages(env.get("GLIBC_TUNABLES", ""))
    # The python backend stub embeds the system libpython in isolated mode (PYTHONPATH is
    # ignored); the generated model.py files add these folders to sys.path themselves.
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env["FRAMEWISE_TRITON_PYTHONPATH"] = os.pathsep.join(paths)
    return env


def with_huge_pages(tunables: str) -> str:
    """``GLIBC_TUNABLES`` for Triton and its python-backend stubs: the caller's, plus malloc's huge
    pages unless the caller set them either way.

    The heavy SAM 2 parts hand their working memory back after every call (so the stack holds
    one part's activations, not the sum of every part's), and the next call maps it again: with
    4 KiB pages that is ~85,000 page faults per image-encoder call at S = 1024, ~0.1-0.3 s; with
    malloc's blocks madvised for 2 MiB pages, ~3,000 (bench/README.md)."""
    entries = [entry for entry in tunables.split(":") if entry]
    if any(entry.split("=", 1)[0] == HUGE_PAGES_TUNABLE for entry in entries):
        return tunables
    return ":".join([*entries, f"{HUGE_PAGES_TUNABLE}=1"])


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class ManagedTriton:
    """A tritonserver child process: start, wait for readiness, supervise, stop."""

    def __init__(
        self,
        model_repository: Path,
        work_dir: Path,
        ports: TritonPorts = TritonPorts(),
        *,
        startup_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        restart_on_exit: bool = True,
        startup_attempts: int = 3,
        extra_args: tuple[str, ...] = (),
        distribution: TritonDistribution | None = None,
    ) -> None:
        self.model_repository = model_repository
        self.work_dir = work_dir
        self.ports = ports
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restart_on_exit = restart_on_exit
        if startup_attempts < 1:
            raise ValueError(f"startup_attempts must be >= 1, got {startup_attempts}")
        self.startup_attempts = startup_attempts
        self.extra_args = extra_args
        self._dist = distribution or TritonDistribution.from_pytriton()
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"{self.ports.connect_host}:{self.ports.grpc}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    def command(self) -> list[str]:
        backends = prepare_backend_directory(self._dist, self.work_dir / "backends")
        return [
            str(self._dist.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--grpc-port={self.ports.grpc}",
            f"--http-port={self.ports.http}",
            f"--metrics-port={self.ports.metrics}",
            f"--grpc-address={self.ports.bind_address}",
            f"--http-address={self.ports.bind_address}",
            f"--metrics-address={self.ports.bind_address}",
            # config.pbtxt files are complete; skipping auto-complete saves a stub start per model.
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            f"--exit-timeout-secs={int(self.stop_timeout_s)}",
            # Room for a full batch of 640x640x3 frames without growing the shared memory.
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--backend-config=python,shm-region-prefix-name={BACKEND_REGION_PREFIX}",
            *self.extra_args,
        ]

    async def start(self) -> None:
        """Start Triton and return once it reports ready; TritonStartError otherwise.

        A start that crashes (killed by a signal before it is ready) is tried again, up to
        ``startup_attempts`` in all: a crash in its first second need not repeat (the one seen
        here, SIGABRT with ``epoll_wait error: Bad file descriptor``, was the forked child dying
        before exec, see server/processes.py). An error exit or a timeout is raised at once."""
        self._stopping = False
        for attempt in range(1, self.startup_attempts + 1):
            await self._spawn()
            try:
                await self._wait_ready()
                break
            except TritonStartError as exc:
                if not exc.crashed or attempt == self.startup_attempts or self._stopping:
                    raise
                log.warning(
                    "triton crashed during startup; starting it again",
                    extra={"attempt": attempt, "of": self.startup_attempts, "error": str(exc)},
                )
        if self.restart_on_exit and self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="triton-supervisor")

    @property
    def run_dir(self) -> Path:
        """Files the model instances of the running server share (FRAMEWISE_TRITON_RUN_DIR): the
        python backend's instances of one model see there which of them are executing."""
        return self.work_dir / "run"

    def environment(self) -> dict[str, str]:
        """The environment to start tritonserver with (``child_environment`` and the run
        directory), the run directory emptied: a previous server's files go with its instances."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        return {**child_environment(self._dist), RUN_DIR_ENV: str(self.run_dir)}

    async def _spawn(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(reclaim_backend_regions)
        command = self.command()
        log.info("starting triton", extra={"command": " ".join(command), "log_file": str(self.log_path)})
        with open(self.log_path, "ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                env=self.environment(),
                # If the orchestrator is killed (even with SIGKILL), Triton gets SIGTERM.
                preexec_fn=child_setup(signal.SIGTERM),
            )

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        client = triton_aio.InferenceServerClient(self.url)
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                code = self._process.returncode
                if code is not None:
                    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
                    raise TritonStartError(
                        f"tritonserver {how} during startup; last lines of {self.log_path}:\n{self.log_tail()}",
                        crashed=code < 0,
                    )
                try:
                    if await client.is_server_ready(client_timeout=2.0):
                        log.info("triton ready", extra={"url": self.url, "pid": self._process.pid})
                        return
                except Exception:  # not listening yet
                    pass
                await asyncio.sleep(0.25)
        finally:
            await client.close()
        await self._terminate()
        raise TritonStartError(
            f"tritonserver was not ready within {self.startup_timeout_s:.0f} s; "
            f"last lines of {self.log_path}:\n{self.log_tail()}"
        )

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self._stopping:
                return
            log.error("triton exited unexpectedly; restarting", extra={"exit_code": code, "backoff_s": backoff})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            try:
                await self._spawn()
                await self._wait_ready()
                self.restarts += 1
                backoff = 1.0
            except Exception as exc:  # noqa: BLE001 - keep supervising whatever went wrong
                log.error("triton restart failed", extra={"error": str(exc)})

    async def stop(self) -> None:
        self._stopping = True
        await cancel_and_wait(self._supervisor)
        self._supervisor = None
        await self._terminate()

    async def _terminate(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        await terminate(process, self.stop_timeout_s + 5, "triton")
        log.info("triton stopped", extra={"exit_code": process.returncode})

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def reclaim_backend_regions(
    shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), *, min_age_s: float = BACKEND_REGION_MIN_AGE_S
) -> list[str]:
    """Unlinks the python-backend regions (BACKEND_REGION_PREFIX) of this user that no process maps
    and that are older than ``min_age_s``: what a Triton that died left behind. Returns their names.

    Only this user's regions: Triton creates them 0644, so only a process of this user (or root) can
    map one read-write as the python backend does, and those processes' maps are readable; a process
    whose maps are not (PID 1 of some sandboxes, another user's) is not a Triton of ours. Without a
    readable /proc nothing is touched."""
    try:
        candidates = [entry for entry in shm_dir.iterdir() if entry.name.startswith(BACKEND_REGION_PREFIX)]
    except OSError:
        return []
    if not candidates:
        return []
    mapped = _mapped_files(proc)
    if mapped is None:
        return []
    now, me = time.time(), os.geteuid()
    reclaimed = []
    for entry in candidates:
        try:
            stat = entry.stat()
            if stat.st_uid != me or str(entry) in mapped or now - stat.st_mtime < min_age_s:
                continue
            entry.unlink()
        except (FileNotFoundError, PermissionError):
            continue  # gone meanwhile, or not ours to unlink (sticky /dev/shm)
        log.warning("reclaimed a Triton python-backend region left by a Triton that died", extra={"region": entry.name})
        reclaimed.append(entry.name)
    return reclaimed


def _mapped_files(proc: Path) -> set[str] | None:
    """Every file some process whose maps are readable maps, or None when ``proc`` cannot be
    listed."""
    mapped: set[str] = set()
    try:
        pids = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            text = (pid / "maps").read_text()
        except OSError:
            continue  # exited meanwhile, or not readable by us (see reclaim_backend_regions)
        for line in text.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                mapped.add(fields[5].removesuffix(" (deleted)"))
    return mapped
