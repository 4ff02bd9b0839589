"""`JobStore` on the standard library's sqlite3.

Durability
    WAL journal with ``synchronous=FULL``: every commit fsyncs the WAL before returning, so an
    event is on stable storage before ``append_event`` returns and before anyone can publish it.
    WAL with ``synchronous=NORMAL`` would already survive ``kill -9`` (the WAL bytes sit in the
    OS page cache, which outlives the process), but not a power cut or a kernel crash, after
    which a client that saw sequence N could later see a *different* event N. Job events are
    few (the stages throttle their progress events), so one fsync per event is cheap; pass
    ``synchronous="NORMAL"`` to trade that guarantee for speed.

Threading
    All database work runs on one dedicated thread (server/sqlite_thread.py) that owns the
    only connection. sqlite3 connections must not be shared between threads without a
    lock, and a single writer serialises transactions anyway, so one thread gives the same
    throughput as a pool without lock juggling, keeps the event loop free, and makes every
    method's transaction run to completion before the next starts. Writes still use
    ``BEGIN IMMEDIATE`` (take the write lock before reading ``last_sequence``), so sequence
    assignment stays atomic even if another process opens the same file; ``busy_timeout``
    makes such a process wait instead of failing.

Schema
    ``schema_version`` holds one row; ``_MIGRATIONS`` is an ordered list of scripts, each run in
    its own transaction together with the version bump, so adding version 2 is one more entry.
    Times are integer microseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

from server.auth.principal import DEFAULT_TENANT
from server.errors import shown
from server.jobs.store.rows import decode_token, encode_token
from server.jobs.store.sqlite_schema import (  # noqa: F401 - re-exported
    _ARTIFACT_COLUMNS,
    _EPOCH,
    _EVENT_COLUMNS,
    _MIGRATIONS,
    _OP_COLUMNS,
    _REPLICA_COLUMNS,
    SCHEMA_VERSION,
    _artifact_from_row,
    _event_from_row,
    _from_us,
    _op_from_row,
    _replica_from_row,
    _split_sql,
    _to_us,
)
from server.jobs.store.protocol import (
    EVENT_TYPES,
    TERMINAL_EVENT_TYPES,
    UNFINISHED_STATES,
    ArtifactRecord,
    EventRecord,
    JobState,
    JobStoreError,
    LeaseLostError,
    OperationNotFinishedError,
    OperationNotFoundError,
    OperationRecord,
    OperationUpdate,
    OtherTenantError,
    ReplicaRecord,
    RequestIdConflictError,
    check_lease_args,
    check_session_state_args,
    utcnow,
)
from server.jobs.store.notifications import Notification, NotificationKind, NotificationListeners
from server.jobs.store.sqlite_api_keys import SqliteApiKeys
from server.jobs.store.sqlite_quotas import SqliteQuotaMethods
from server.sqlite_thread import SqliteThread

__all__ = ["SCHEMA_VERSION", "SqliteJobStore"]

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class SqliteJobStore(SqliteApiKeys, SqliteQuotaMethods):
    """The SQLite `JobStore`. Open with ``SqliteJobStore(path)`` (the file and its parent
    folder are created); the schema is created or migrated on first use, or explicitly with
    ``await store.open()``."""

    shared_by_replicas = False  # see JobStore.shared_by_replicas

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 10_000,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError("synchronous must be FULL, EXTRA or NORMAL")
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._busy_timeout_ms = busy_timeout_ms
        self._db = SqliteThread("job-store", closed_error=lambda: RuntimeError("job store is closed"))
        self._open_lock = asyncio.Lock()
        self._opened = False
        # One replica: the wake-ups that PostgreSQL sends to every replica are delivered in
        # process, after the write they announce committed (see listen()).
        self._notifications = NotificationListeners()

    # -- plumbing -----------------------------------------------------------------------------

    def listen(self, callback: Callable[[Notification], None]) -> Callable[[], None]:
        """JobStore.listen. In process: QUEUED, CANCEL and RELEASED after their write
        committed; no EVENT (the EventBus that appended an event hands it to its watchers) and
        no RESYNC (nothing can be missed)."""
        return self._notifications.add(callback)

    async def open(self) -> SqliteJobStore:
        async with self._open_lock:
            if self._db.closed:
                raise RuntimeError("job store is closed")
            if not self._opened:
                await self._db.run(self._open_sync)
                self._opened = True
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._opened:
            await self.open()
        return await self._db.run(fn, *args)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._db.connect(self.path, busy_timeout_ms=self._busy_timeout_ms, synchronous=self._synchronous)
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate_sync()

    def _migrate_sync(self) -> None:
        conn = self._require_conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
                current = 0
            else:
                current = row[0]
            if current > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {current}, newer than this code's {SCHEMA_VERSION}")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for stmt in _split_sql(_MIGRATIONS[version - 1]):
                    conn.execute(stmt)
                conn.execute("UPDATE schema_version SET version = ?", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _require_conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn`` inside BEGIN IMMEDIATE ... COMMIT on the store's thread."""
        return self._db.write(fn)

    async def close(self) -> None:
        await self._db.close(connected=self._opened)

    async def schema_version(self) -> int:
        def q() -> int:
            return self._require_conn().execute("SELECT version FROM schema_version").fetchone()[0]

        return await self._run(q)

    # -- operations -----------------------------------------------------------------------------

    @staticmethod
    def _get_sync(conn: sqlite3.Connection, name: str, tenant: str | None = None) -> OperationRecord:
        row = conn.execute(f"SELECT {_OP_COLUMNS} FROM operations WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise OperationNotFoundError(name)
        op = _op_from_row(row)
        if tenant is not None and op.tenant != tenant:
            raise OtherTenantError(name)
        return op

    async def create_operation(
        self,
        *,
        kind: int,
        request: bytes,
        request_id: str | None = None,
        message: str = "",
        stage: int = 0,
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[OperationRecord, bool]:
        request_id = request_id or None

        def tx(conn: sqlite3.Connection) -> tuple[OperationRecord, bool]:
            if request_id is not None:
                existing = self._find_request_sync(conn, request_id, kind, tenant)
                if existing is not None:
                    return existing, False
            name = f"operations/{uuid.uuid4().hex}"
            now = _to_us(utcnow())
            conn.execute(
                "INSERT INTO operations (name, kind, state, stage, message, create_us, update_us, tenant_request_id, tenant) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, int(kind), int(JobState.QUEUED), int(stage), message, now, now, request_id, tenant),
            )
            conn.execute("INSERT INTO operation_requests (name, request) VALUES (?, ?)", (name, bytes(request)))
            return self._get_sync(conn, name), True

        op, created = await self._run(self._write, tx)
        if created:
            self._notifications.deliver(Notification(NotificationKind.QUEUED, op.name))
        return op, created

    async def find_request(self, request_id: str, kind: int, *, tenant: str = DEFAULT_TENANT) -> OperationRecord | None:
        return await self._run(lambda: self._find_request_sync(self._require_conn(), request_id, kind, tenant))

    @staticmethod
    def _find_request_sync(conn: sqlite3.Connection, request_id: str, kind: int, tenant: str) -> OperationRecord | None:
        row = conn.execute(
            f"SELECT {_OP_COLUMNS} FROM operations WHERE tenant = ? AND tenant_request_id = ?", (tenant, request_id)
        ).fetchone()
        if row is None:
            return None
        existing = _op_from_row(row)
        if existing.kind != kind:
            raise RequestIdConflictError(f"request_id {shown(request_id)} was used for {existing.name} of another kind")
        return existing

    async def get_operation(self, name: str, *, tenant: str | None = None) -> OperationRecord:
        return await self._run(lambda: self._get_sync(self._require_conn(), name, tenant))

    async def get_request(self, name: str) -> bytes:
        def q() -> bytes:
            conn = self._require_conn()
            row = conn.execute("SELECT request FROM operation_requests WHERE name = ?", (name,)).fetchone()
            if row is not None:
                return bytes(row[0])
            op = self._get_sync(conn, name)  # OperationNotFoundError for an unknown name
            if not op.state.is_terminal:
                # Never written that way; an empty request would parse as a valid default one.
                raise JobStoreError(f"{name} is {op.state.name} but its request is not stored")
            return b""  # finished: dropped with the terminal state

        return await self._run(q)

    async def list_operations(
        self,
        *,
        states: JobState | Iterable[JobState] | None = None,
        kind: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        tenant: str | None = None,
    ) -> tuple[list[OperationRecord], str]:
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
        where: list[str] = []
        params: list[Any] = []
        state_list: list[int] | None = None
        if states is not None:
            state_list = [int(states)] if isinstance(states, int) else [int(s) for s in states]
            if not state_list:
                return [], ""
            where.append(f"state IN ({','.join('?' * len(state_list))})")
            params.extend(state_list)
        # The filter as the token records it (state order does not matter); the tenant too, so
        # a token never continues another tenant's listing.
        scope = [None if state_list is None else sorted(set(state_list)), None if kind is None else int(kind), tenant]
        if kind is not None:
            where.append("kind = ?")
            params.append(int(kind))
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if page_token:
            after_us, after_name = decode_token(page_token, scope)
            where.append("(create_us > ? OR (create_us = ? AND name > ?))")
            params.extend([after_us, after_us, after_name])
        sql = f"SELECT {_OP_COLUMNS} FROM operations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY create_us, name LIMIT ?"
        params.append(size + 1)

        def q() -> list[OperationRecord]:
            return [_op_from_row(r) for r in self._require_conn().execute(sql, params).fetchall()]

        rows = await self._run(q)
        if len(rows) <= size:
            return rows, ""
        items = rows[:size]
        last = items[-1]
        return items, encode_token(_to_us(last.create_time), last.name, scope)

    @staticmethod
    def _apply_update_sync(conn: sqlite3.Connection, name: str, update: OperationUpdate, now_us: int) -> None:
        # Only the two columns the update depends on: this runs inside every event's transaction.
        times = conn.execute("SELECT start_us, end_us FROM operations WHERE name = ?", (name,)).fetchone()
        if times is None:
            raise OperationNotFoundError(name)
        start_us, end_us = times
        sets: list[str] = ["update_us = ?"]
        params: list[Any] = [now_us]
        if update.state is not None:
            state = JobState(update.state)
            sets.append("state = ?")
            params.append(int(state))
            if state == JobState.RUNNING and start_us is None and update.start_time is None:
                sets.append("start_us = ?")
                params.append(now_us)
            if state.is_terminal and end_us is None and update.end_time is None:
                sets.append("end_us = ?")
                params.append(now_us)
            if state.is_terminal:  # see JobStore.get_request
                conn.execute("DELETE FROM operation_requests WHERE name = ?", (name,))
        for attr, column, conv in (
            ("stage", "stage", int),
            ("percent", "percent", float),
            ("message", "message", str),
            ("response", "response", bytes),
            ("last_completed_stage", "last_completed_stage", int),
            ("start_time", "start_us", _to_us),
            ("end_time", "end_us", _to_us),
        ):
            value = getattr(update, attr)
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(conv(value))
        if update.error is not None:
            code, msg = update.error
            sets.append("error_code = ?")
            sets.append("error_message = ?")
            params.extend([int(code), str(msg)])
        params.append(name)
        conn.execute(f"UPDATE operations SET {', '.join(sets)} WHERE name = ?", params)

    async def update_operation(
        self,
        name: str,
        update: OperationUpdate | None = None,
        /,
        *,
        epoch: int | None = None,
        **fields_: Any,
    ) -> OperationRecord:
        if update is None:
            update = OperationUpdate(**fields_)
        elif fields_:
            raise TypeError("pass either an OperationUpdate or keyword fields, not both")

        def tx(conn: sqlite3.Connection) -> OperationRecord:
            self._check_epoch_sync(conn, name, epoch)
            self._apply_update_sync(conn, name, update, _to_us(utcnow()))
            return self._get_sync(conn, name)

        return await self._run(self._write, tx)

    async def request_cancel(self, name: str, *, tenant: str | None = None) -> OperationRecord:
        def tx(conn: sqlite3.Connection) -> tuple[OperationRecord, bool]:
            op = self._get_sync(conn, name, tenant)
            if op.state.is_terminal or op.cancel_requested:
                return op, False
            conn.execute(
                "UPDATE operations SET cancel_requested = 1, update_us = ? WHERE name = ?",
                (_to_us(utcnow()), name),
            )
            return self._get_sync(conn, name), True

        op, requested = await self._run(self._write, tx)
        if requested:
            self._notifications.deliver(Notification(NotificationKind.CANCEL, name))
        return op

    async def delete_operation(self, name: str, *, tenant: str | None = None) -> list[str]:
        def tx(conn: sqlite3.Connection) -> list[str]:
            op = self._get_sync(conn, name, tenant)
            if not op.state.is_terminal:
                raise OperationNotFinishedError(name, op.state)
            paths = [
                r[0] for r in conn.execute("SELECT path FROM artifacts WHERE operation = ? ORDER BY name", (name,))
            ]
            # Explicit deletes as well as ON DELETE CASCADE: correct even on a connection where
            # foreign keys were left off.
            conn.execute("DELETE FROM events WHERE operation = ?", (name,))
            conn.execute("DELETE FROM artifacts WHERE operation = ?", (name,))
            conn.execute("DELETE FROM operation_requests WHERE name = ?", (name,))
            conn.execute("DELETE FROM operations WHERE name = ?", (name,))
            return paths

        return await self._run(self._write, tx)

    async def finished_before(self, cutoff: datetime, limit: int = 500) -> list[str]:
        terminal = [int(s) for s in JobState if s.is_terminal]

        def q() -> list[str]:
            rows = self._require_conn().execute(
                f"SELECT name FROM operations WHERE state IN ({','.join('?' * len(terminal))}) AND end_us < ? "
                "ORDER BY end_us, name LIMIT ?",
                (*terminal, _to_us(cutoff), max(1, int(limit))),
            )
            return [r[0] for r in rows]

        return await self._run(q)

    async def unfinished_operations(self) -> list[OperationRecord]:
        states = [int(s) for s in UNFINISHED_STATES]

        def q() -> list[OperationRecord]:
            rows = self._require_conn().execute(
                f"SELECT {_OP_COLUMNS} FROM operations WHERE state IN (?, ?) ORDER BY create_us, name",
                states,
            )
            return [_op_from_row(r) for r in rows]

        return await self._run(q)

    # -- events ---------------------------------------------------------------------------------

    async def append_event(
        self,
        name: str,
        event_type: str,
        payload: bytes,
        *,
        terminal: bool | None = None,
        update: OperationUpdate | None = None,
        epoch: int | None = None,
    ) -> EventRecord:
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event_type {event_type!r}; stored types: {sorted(EVENT_TYPES)}")
        is_terminal = event_type in TERMINAL_EVENT_TYPES if terminal is None else bool(terminal)
        payload = bytes(payload)

        def tx(conn: sqlite3.Connection) -> EventRecord:
            # BEGIN IMMEDIATE holds the write lock from here, so no other writer (thread or
            # process) can read the same last_sequence.
            row = conn.execute(
                "SELECT last_sequence, lease_epoch, lease_owner FROM operations WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise OperationNotFoundError(name)
            if epoch is not None and row[1] != epoch:
                raise LeaseLostError(name, epoch, row[1], row[2])
            seq = row[0] + 1
            now = utcnow()
            now_us = _to_us(now)
            conn.execute(
                f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (name, seq, now_us, event_type, payload, int(is_terminal)),
            )
            conn.execute(
                "UPDATE operations SET last_sequence = ?, update_us = ? WHERE name = ?",
                (seq, now_us, name),
            )
            if update is not None and not update.is_empty():
                self._apply_update_sync(conn, name, update, now_us)
            return EventRecord(name, seq, _from_us(now_us), event_type, payload, is_terminal)  # type: ignore[arg-type]

        return await self._run(self._write, tx)

    async def events_after(self, name: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        def q() -> list[EventRecord]:
            rows = self._require_conn().execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE operation = ? AND sequence > ? ORDER BY sequence LIMIT ?",
                (name, int(after_sequence), max(1, int(limit))),
            )
            return [_event_from_row(r) for r in rows]

        return await self._run(q)

    # -- artifacts ------------------------------------------------------------------------------

    async def add_artifact(self, artifact: ArtifactRecord, *, epoch: int | None = None) -> ArtifactRecord:
        a = artifact

        def tx(conn: sqlite3.Connection) -> ArtifactRecord:
            if conn.execute("SELECT 1 FROM operations WHERE name = ?", (a.operation,)).fetchone() is None:
                raise OperationNotFoundError(a.operation)
            self._check_epoch_sync(conn, a.operation, epoch)
            conn.execute(
                f"INSERT INTO artifacts ({_ARTIFACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (operation, name) DO UPDATE SET kind = excluded.kind, "
                "media_type = excluded.media_type, path = excluded.path, size = excluded.size, "
                "sha256 = excluded.sha256, expire_us = excluded.expire_us",
                (
                    a.operation,
                    a.name,
                    int(a.kind),
                    a.media_type,
                    str(a.path),
                    int(a.size),
                    a.sha256,
                    None if a.expire_time is None else _to_us(a.expire_time),
                ),
            )
            return a

        return await self._run(self._write, tx)

    async def list_artifacts(self, name: str, *, tenant: str | None = None) -> list[ArtifactRecord]:
        def q() -> list[ArtifactRecord]:
            sql = f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE operation = ?"
            params: tuple[str, ...] = (name,)
            if tenant is not None:
                sql += " AND operation IN (SELECT name FROM operations WHERE name = ? AND tenant = ?)"
                params = (name, name, tenant)
            rows = self._require_conn().execute(sql + " ORDER BY name", params)
            return [_artifact_from_row(r) for r in rows]

        return await self._run(q)

    async def tenant_usage(self, tenant: str) -> tuple[list[str], int, int]:
        def q() -> tuple[list[str], int, int]:
            conn = self._require_conn()
            names = [r[0] for r in conn.execute("SELECT name FROM operations WHERE tenant = ? ORDER BY name", (tenant,))]
            files, size = conn.execute(
                "SELECT count(*), coalesce(sum(a.size), 0) FROM artifacts a JOIN operations o ON o.name = a.operation "
                "WHERE o.tenant = ?",
                (tenant,),
            ).fetchone()
            return names, int(files), int(size)

        return await self._run(q)

    # -- leases ---------------------------------------------------------------------------------
    # One writer at a time (BEGIN IMMEDIATE) makes a claim's select-then-update atomic against
    # every other connection to the file, so concurrent claimers never share an operation. The
    # clock is this machine's: a SQLite store has one replica.

    @staticmethod
    def _check_epoch_sync(conn: sqlite3.Connection, name: str, epoch: int | None) -> None:
        if epoch is None:
            return
        row = conn.execute("SELECT lease_epoch, lease_owner FROM operations WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise OperationNotFoundError(name)
        if row[0] != epoch:
            raise LeaseLostError(name, epoch, row[0], row[1])

    async def claim_next(
        self, replica_id: str, lease_s: float, *, skip: Collection[str] = ()
    ) -> OperationRecord | None:
        check_lease_args(replica_id, lease_s)
        skipped = list(skip)

        def tx(conn: sqlite3.Connection) -> OperationRecord | None:
            now_us = _to_us(utcnow())
            row = conn.execute(
                "SELECT name FROM operations WHERE state IN (?, ?) "
                "AND (lease_expire_us IS NULL OR lease_expire_us <= ?) "
                f"AND name NOT IN ({', '.join('?' * len(skipped))}) ORDER BY create_us, name LIMIT 1",
                (*(int(s) for s in UNFINISHED_STATES), now_us, *skipped),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE operations SET lease_owner = ?, lease_epoch = lease_epoch + 1, lease_expire_us = ? "
                "WHERE name = ?",
                (replica_id, now_us + round(lease_s * 1_000_000), row[0]),
            )
            return self._get_sync(conn, row[0])

        return await self._run(self._write, tx)

    async def renew_lease(self, name: str, replica_id: str, epoch: int, lease_s: float) -> OperationRecord:
        check_lease_args(replica_id, lease_s)

        def tx(conn: sqlite3.Connection) -> OperationRecord:
            op = self._get_sync(conn, name)
            if op.lease_owner != replica_id or op.lease_epoch != epoch or op.state.is_terminal:
                raise LeaseLostError(name, epoch, op.lease_epoch, op.lease_owner)
            conn.execute(
                "UPDATE operations SET lease_expire_us = ? WHERE name = ?",
                (_to_us(utcnow()) + round(lease_s * 1_000_000), name),
            )
            return self._get_sync(conn, name)

        return await self._run(self._write, tx)

    async def release_lease(self, name: str, replica_id: str, epoch: int) -> None:
        def tx(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute(
                    "UPDATE operations SET lease_owner = NULL, lease_expire_us = NULL "
                    "WHERE name = ? AND lease_owner = ? AND lease_epoch = ?",
                    (name, replica_id, int(epoch)),
                ).rowcount
                > 0
            )

        if await self._run(self._write, tx):
            self._notifications.deliver(Notification(NotificationKind.RELEASED, name))

    # -- the engine's view ------------------------------------------------------------------------

    _WAITING = "state IN (?, ?) AND (lease_expire_us IS NULL OR lease_expire_us <= ?)"

    async def count_waiting(self) -> int:
        def q() -> int:
            args = (*(int(s) for s in UNFINISHED_STATES), _to_us(utcnow()))
            return self._require_conn().execute(f"SELECT count(*) FROM operations WHERE {self._WAITING}", args).fetchone()[0]

        return await self._run(q)

    async def waiting_position(self, name: str) -> int:
        def q() -> int:
            conn = self._require_conn()
            args = (*(int(s) for s in UNFINISHED_STATES), _to_us(utcnow()))
            me = conn.execute(
                f"SELECT create_us FROM operations WHERE name = ? AND {self._WAITING}", (name, *args)
            ).fetchone()
            if me is None:
                return -1
            return conn.execute(
                f"SELECT count(*) FROM operations WHERE {self._WAITING} AND (create_us < ? OR (create_us = ? AND name < ?))",
                (*args, me[0], me[0], name),
            ).fetchone()[0]

        return await self._run(q)

    async def try_cluster_duty(self, duty: str) -> bool:
        return True  # one SQLite file, one replica: every duty is this one's

    # -- replicas -------------------------------------------------------------------------------

    async def register_replica(self, replica_id: str, address: str) -> ReplicaRecord:
        if not replica_id:
            raise ValueError("replica_id must not be empty")

        def tx(conn: sqlite3.Connection) -> ReplicaRecord:
            now_us = _to_us(utcnow())
            conn.execute(
                "INSERT INTO replicas (replica_id, address, register_us, heartbeat_us) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (replica_id) DO UPDATE SET address = excluded.address, heartbeat_us = excluded.heartbeat_us",
                (replica_id, address, now_us, now_us),
            )
            row = conn.execute(f"SELECT {_REPLICA_COLUMNS} FROM replicas WHERE replica_id = ?", (replica_id,)).fetchone()
            return _replica_from_row(row)

        return await self._run(self._write, tx)

    async def list_replicas(self, *, seen_within_s: float | None = None) -> list[ReplicaRecord]:
        def q() -> list[ReplicaRecord]:
            since = -1 if seen_within_s is None else _to_us(utcnow()) - round(seen_within_s * 1_000_000)
            rows = self._require_conn().execute(
                f"SELECT {_REPLICA_COLUMNS} FROM replicas WHERE heartbeat_us >= ? ORDER BY replica_id", (since,)
            ).fetchall()
            return [_replica_from_row(r) for r in rows]

        return await self._run(q)

    # -- tracking sessions handed off -------------------------------------------------------------

    async def put_session_state(self, key: str, state: bytes, ttl_s: float, *, tenant: str = DEFAULT_TENANT) -> None:
        check_session_state_args(key, ttl_s)

        def tx(conn: sqlite3.Connection) -> None:
            now_us = _to_us(utcnow())
            conn.execute("DELETE FROM tracking_sessions WHERE expire_us <= ?", (now_us,))
            conn.execute(
                "INSERT INTO tracking_sessions (tenant, session_key, state, expire_us) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant, session_key) DO UPDATE SET state = excluded.state, expire_us = excluded.expire_us",
                (tenant, key, bytes(state), now_us + round(ttl_s * 1_000_000)),
            )

        await self._run(self._write, tx)

    async def take_session_state(self, key: str, *, tenant: str = DEFAULT_TENANT) -> bytes | None:
        def tx(conn: sqlite3.Connection) -> bytes | None:
            # One statement inside BEGIN IMMEDIATE: a second taker waits for this commit and then
            # finds no row.
            row = conn.execute(
                "DELETE FROM tracking_sessions WHERE tenant = ? AND session_key = ? RETURNING state, expire_us",
                (tenant, key),
            ).fetchone()
            if row is None or row[1] <= _to_us(utcnow()):
                return None
            return bytes(row[0])

        return await self._run(self._write, tx)

