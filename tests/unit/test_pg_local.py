"""The project's PostgreSQL launcher (server/pg/local.py): a real server started with no manual
step, as an unprivileged account, reachable only with its password, restartable with its data."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import psycopg
import pytest

from server.pg.local import LocalPostgres, find_bindir
from tests.conftest import REPO


def process_uid(pid: int) -> int:
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


async def test_start_stop_restart_and_crash_keep_committed_data() -> None:
    server = LocalPostgres()
    try:
        url = await server.start()
        assert server.pid is not None and server.root is not None
        if os.geteuid() == 0:
            assert process_uid(server.pid) != 0  # PostgreSQL refuses root; it runs as another account
        assert oct(server.root.stat().st_mode & 0o777) == "0o700"
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            assert (await (await conn.execute("SELECT current_database()")).fetchone()) == ("framewise",)
            await conn.execute("CREATE TABLE kept (n integer)")
            await conn.execute("INSERT INTO kept VALUES (1)")
        bad = url.replace(url.split(":")[2].split("@")[0], "wrong-password")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await psycopg.AsyncConnection.connect(bad)

        port = server.port
        await server.stop()
        assert server.pid is None
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(url, connect_timeout=2)
        assert await server.start() == url and server.port == port  # same folder, port, password
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("INSERT INTO kept VALUES (2)")
        await server.crash()  # no checkpoint: the restart replays the WAL
        await server.start()
        async with await psycopg.AsyncConnection.connect(url) as conn:
            assert await (await conn.execute("SELECT n FROM kept ORDER BY n")).fetchall() == [(1,), (2,)]
    finally:
        root = server.root
        await server.close()
    assert root is not None and not root.exists()  # a folder it made itself is removed


def test_missing_binaries_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="make pg-deps"):
        find_bindir(tmp_path)


async def test_the_command_prints_its_url_and_stops_on_sigterm() -> None:
    # What `make serve-cluster` runs: the URL on stdout once it accepts connections.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.pg", cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        assert line.startswith("postgresql://"), line
        async with await psycopg.AsyncConnection.connect(line) as conn:
            assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(line, connect_timeout=2)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
