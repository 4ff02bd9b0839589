"""One SQLite file, one connection, one thread: how the job store (server/jobs/store/sqlite.py)
and the result cache (server/cache/result_cache.py) open, write and close their database.

sqlite3 connections must not be shared between threads without a lock, and SQLite serialises
writers anyway, so each owner runs every database call on its own single-thread executor: the
event loop never waits on the disk, and each call's transaction runs to completion before the
next starts. The file is in WAL mode (readers and one writer at a time, across processes: the
serving process and the job worker process may open the same file), and a write lock held by
another connection is waited for up to ``busy_timeout_ms``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["SqliteThread"]

T = TypeVar("T")


class SqliteThread:
    """The thread that owns one SQLite connection. ``connect``, ``conn`` and ``write`` are called
    on that thread (through ``run``); ``closed_error`` makes what a call after ``close`` raises."""

    def __init__(self, thread_name: str, *, closed_error: Callable[[], Exception]) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.closed = False
        self._conn: sqlite3.Connection | None = None  # only touched on the executor thread
        self._closed_error = closed_error

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def connect(self, path: Path, *, busy_timeout_ms: int, synchronous: str) -> sqlite3.Connection:
        """Opens ``path`` in autocommit mode (every transaction is explicit: ``write``), WAL,
        with that busy timeout and ``PRAGMA synchronous``."""
        conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # readers and one writer at a time, across processes
            conn.close()
            raise RuntimeError(f"could not switch {path} to WAL (journal_mode={mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        self._conn = conn
        return conn

    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self._closed_error()
        return self._conn

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` inside BEGIN IMMEDIATE ... COMMIT: the write lock first, so no lock upgrade can
        deadlock against another process, and whatever ``fn`` reads stays true until COMMIT."""
        conn = self.conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # a failed COMMIT too: the next BEGIN must not find it open
                conn.execute("ROLLBACK")
            raise
        return result

    async def close(self, *, connected: bool = True) -> None:
        """Closes the connection on its thread (``connected=False``: it was never opened, there
        is nothing to close), then the thread. Later calls do nothing."""
        if self.closed:
            return
        self.closed = True

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if connected:
            await self.run(_close)
        self.executor.shutdown(wait=True)
