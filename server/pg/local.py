"""Starts a real PostgreSQL server for tests and for a one-machine cluster (``make serve-cluster``).

Where the binaries come from
    Debian's ``postgresql-15`` package (``make pg-deps``, part of ``make test``): the server
    PostgreSQL ships and patches, the same one a Debian production host runs. It is found under
    ``/usr/lib/postgresql/<major>/bin`` (newest major first), or wherever ``FRAMEWISE_PG_BIN``
    (or ``bindir=``) points.

Why another user
    ``postgres`` refuses to run as root (a superuser-owned server could be made to run anything
    as root). As root, the server runs as Debian's ``postgres`` account when the package made it,
    else as a ``framewise-pg`` system account created with ``useradd``, else as ``nobody``. As any
    other user it runs as that user. Its folder (data, unix socket, log, password file) is
    owned by that account with mode 0700, under a folder every user can traverse (the system
    temporary folder by default: pytest's own tmp folders are root-only).

What it listens on
    127.0.0.1 on a free port and a unix socket in its folder; nothing else. Authentication is
    scram-sha-256 with a random password (in ``url``), so other local users cannot connect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Self

from server.processes import child_setup

__all__ = ["LocalPostgres", "PostgresNotFoundError", "PostgresStartError", "find_bindir"]

log = logging.getLogger(__name__)

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "framewise"
DATABASE = "framewise"
SYSTEM_ACCOUNT = "framewise-pg"
# Enough for N replicas' pools plus the tests' own connections (the default is 100).
DEFAULT_SETTINGS = {"max_connections": "200"}


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


class PostgresStartError(RuntimeError):
    """initdb or the server failed; the message carries the end of its log."""


def find_bindir(explicit: str | Path | None = None) -> Path:
    """The folder holding ``postgres`` and ``initdb``: ``explicit``, else ``FRAMEWISE_PG_BIN``,
    else Debian's newest ``/usr/lib/postgresql/<major>/bin``, else the folder of ``initdb`` on PATH."""
    chosen = explicit or os.environ.get("FRAMEWISE_PG_BIN")
    candidates: list[Path] = []
    if chosen:
        candidates.append(Path(chosen))
    else:
        if DEBIAN_ROOT.is_dir():
            majors = sorted(
                (p for p in DEBIAN_ROOT.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True
            )
            candidates += [p / "bin" for p in majors]
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "postgres").is_file() and (folder / "initdb").is_file():
            return folder
    where = str(candidates[0]) if chosen else f"{DEBIAN_ROOT}/<major>/bin or PATH"
    raise PostgresNotFoundError(
        f"no PostgreSQL server binaries (postgres, initdb) in {where}: run `make pg-deps` "
        "(Debian's postgresql-15) or set FRAMEWISE_PG_BIN to their folder"
    )


async def _run(*argv: str, user: str | None, timeout_s: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        user=user,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_child_env(),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def _child_env() -> dict[str, str]:
    # The C locale: initdb and the server must not depend on the locales this machine has.
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "TZ")}
    return {**keep, "LC_ALL": "C", "LANG": "C"}


async def server_account() -> str | None:
    """The account the server runs as: None (this process's own) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", SYSTEM_ACCOUNT):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    if shutil.which("useradd"):
        # Two test processes may race here: whoever loses sees "already exists" and then finds it.
        await _run(
            "useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", SYSTEM_ACCOUNT, user=None, timeout_s=30,
        )  # fmt: skip
        try:
            pwd.getpwnam(SYSTEM_ACCOUNT)
            return SYSTEM_ACCOUNT
        except KeyError:
            pass
    log.warning("could not create a system account for PostgreSQL; running it as nobody")
    return "nobody"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """One PostgreSQL server in its own folder.

    ``await start()`` creates the cluster (once) and starts the server; ``url`` is then a
    ``postgresql://`` URL of its ``framewise`` database. ``await stop()`` stops it and keeps the
    folder (``start()`` again restarts it on the same port, with everything committed);
    ``await close()`` stops it and removes a folder it created itself.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        port: int | None = None,
        bindir: str | Path | None = None,
        settings: dict[str, str] | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.bindir = find_bindir(bindir)
        self._given_root = Path(root) if root is not None else None
        self.root: Path | None = self._given_root
        self.port = port
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._account: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._password = ""

    # -- paths ----------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._require_root() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_root() / "postgres.log"

    @property
    def url(self) -> str:
        """libpq URL of the ``framewise`` database (valid while started)."""
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        if self.port is None or not self._password:
            raise RuntimeError("the server has not been started")
        return f"postgresql://{SUPERUSER}:{self._password}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None or self._process.returncode is not None else self._process.pid

    def _require_root(self) -> Path:
        if self.root is None:
            raise RuntimeError("the server has no folder yet: call start()")
        return self.root

    # -- life -----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> str:
        """Creates the cluster if its folder has none, starts the server, waits until it accepts
        connections and returns ``url``."""
        if self.pid is not None:
            return self.url
        started = time.monotonic()
        self._account = await server_account()
        if self.root is None:
            # Under the system temporary folder (mode 1777): the server's account must reach it.
            self.root = Path(tempfile.mkdtemp(prefix="framewise-pg-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._own(self.root)
        os.chmod(self.root, 0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            await self._initdb()
        self._password = (self.root / "pwfile").read_text().strip()
        fixed_port = self.port is not None
        for attempt in range(5):
            if not fixed_port:
                self.port = free_port()
            try:
                await self._start_server()
                break
            except PostgresStartError as exc:
                # Another process took the free port between our check and the server's bind.
                if fixed_port or attempt == 4 or "could not bind" not in str(exc):
                    raise
        await self._ensure_database()
        log.info(
            "PostgreSQL started",
            extra={"port": self.port, "root": str(self.root), "seconds": round(time.monotonic() - started, 2)},
        )
        return self.url

    def _own(self, path: Path) -> None:
        if self._account is not None:
            entry = pwd.getpwnam(self._account)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    async def _initdb(self) -> None:
        root = self._require_root()
        pwfile = root / "pwfile"
        pwfile.write_text(secrets.token_urlsafe(24) + "\n")
        os.chmod(pwfile, 0o600)
        self._own(pwfile)
        # Throwaway clusters (our own temporary folder) skip initdb's fsyncs: ~1 s on a busy
        # disk, and nothing of them must survive a power cut. The server itself fsyncs normally.
        no_sync = ["--no-sync"] if self._given_root is None else []
        code, out = await _run(
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", *no_sync,
            user=self._account, timeout_s=self.start_timeout_s,
        )  # fmt: skip
        if code != 0:
            raise PostgresStartError(f"initdb failed ({code}): {out[-2000:]}")

    async def _start_server(self) -> None:
        root = self._require_root()
        options: list[str] = []
        for key, value in self.settings.items():
            options += ["-c", f"{key}={value}"]
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it; closed below
        try:
            self._process = await asyncio.create_subprocess_exec(
                str(self.bindir / "postgres"), "-D", str(self.data_dir),
                "-c", "listen_addresses=127.0.0.1", "-c", f"port={self.port}",
                "-c", f"unix_socket_directories={root}", *options,
                user=self._account, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=_child_env(),
                # SIGINT is PostgreSQL's fast shutdown: if this process dies (even by kill -9),
                # the server stops too and leaves no orphan holding the port.
                preexec_fn=child_setup(signal.SIGINT),
            )  # fmt: skip
        finally:
            log_file.close()
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        import psycopg  # the project's driver; imported here so `find_bindir` needs nothing

        deadline = time.monotonic() + self.start_timeout_s
        while True:
            process = self._process
            if process is None or process.returncode is not None:
                raise PostgresStartError(f"the PostgreSQL server exited while starting: {self._log_tail()}")
            try:
                conn = await psycopg.AsyncConnection.connect(self.url_for("postgres"), connect_timeout=2)
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise PostgresStartError(
                        f"PostgreSQL did not accept connections within {self.start_timeout_s} s: {self._log_tail()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            await conn.close()
            return

    async def _ensure_database(self) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.url_for("postgres"), autocommit=True) as conn:
            cur = await conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if await cur.fetchone() is None:
                await conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    async def stop(self) -> None:
        """Fast shutdown (clients are disconnected, committed work is kept); SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout_s)
        except TimeoutError:
            log.warning("PostgreSQL did not stop in time; killing it", extra={"pid": process.pid})
            process.kill()
            await process.wait()

    async def crash(self) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, like a crash): the next ``start()`` replays the
        WAL and everything committed is there. Not SIGKILL: its backends would outlive it for a while
        and hold the shared memory the next start needs."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGQUIT)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout_s)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def close(self) -> None:
        """Stops the server and removes the folder if this object created it."""
        await self.stop()
        if self._given_root is None and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
