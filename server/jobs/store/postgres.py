"""`JobStore` on PostgreSQL: the store every replica of a cluster shares.

Driver
    psycopg 3 with psycopg_pool's AsyncConnectionPool (see the README's "Job store backends"
    for the measurements behind the choice). Connections are in autocommit mode: every
    method is one SQL statement, so one round trip and one transaction, except on error paths
    (which ask why a statement changed nothing) and migrations.

Atomicity in one statement
    Each write is a single statement whose data-modifying CTEs commit together: an event's
    INSERT takes its sequence from the UPDATE that bumps ``last_sequence`` (the row lock
    serialises appenders of one operation, so sequences are contiguous across replicas);
    entering a terminal state deletes the stored request in the same statement.

Fencing
    A write that carries ``epoch`` has ``lease_epoch = epoch`` in its WHERE clause. The row
    lock a claim's UPDATE takes conflicts with the write's, and PostgreSQL re-checks the WHERE
    clause on the newest row version after waiting, so a write either commits before the
    takeover or sees the new epoch and changes nothing (LeaseLostError). Artifacts, which do
    not update the operation row, lock it FOR SHARE for the same effect.

Claiming
    ``SELECT ... FOR UPDATE SKIP LOCKED`` on the oldest claimable operation: concurrent
    claimers skip each other's rows instead of queueing behind them. Lease times are the
    database's clock (``clock_timestamp()``), the one clock all replicas share.

Times
    Operation and event times are the database's clock too, so creation order (and paging)
    is one order across replicas whatever their clocks say.

Unavailability
    A lost connection, a server shutting down or refusing connections, and waiting longer than
    ``acquire_timeout_s`` for a pooled connection raise JobStoreUnavailableError (gRPC:
    UNAVAILABLE). After such a failure one plain connection is tried: if the server answers,
    only that connection was bad (the pool drops its dead idle ones); if not, the store is
    *down*: every call fails at once (no wait for a pooled connection that cannot come) until a
    probe every ``probe_interval_s`` connects and a fresh pool replaces the old one. Reads are
    retried once on a fresh connection; writes are not (whether a write whose connection broke
    committed is unknown, and the caller decides).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import datetime
from typing import Any, Self, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from server.auth.principal import DEFAULT_TENANT
from server.errors import shown
from server.jobs.store.notifications import EVENTS_CHANNEL, JOBS_CHANNEL, Notification, NotificationListeners
from server.jobs.store.postgres_api_keys import PostgresApiKeys
from server.jobs.store.postgres_listen import PostgresListener
from server.jobs.store.postgres_quotas import PostgresQuotaMethods
from server.jobs.store.postgres_schema import (
    ARTIFACT_COLUMNS,
    EVENT_COLUMNS,
    MIGRATION_LOCK,
    MIGRATIONS,
    OP_COLUMNS,
    REPLICA_COLUMNS,
    SCHEMA_MIGRATIONS_DDL,
    SCHEMA_VERSION,
    artifact_from_row,
    event_from_row,
    op_from_row,
    qualified,
    replica_from_row,
)
from server.jobs.store.protocol import (
    EVENT_TYPES,
    TERMINAL_EVENT_TYPES,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    ArtifactRecord,
    EventRecord,
    JobState,
    JobStoreError,
    JobStoreUnavailableError,
    LeaseLostError,
    OperationNotFinishedError,
    OperationNotFoundError,
    OtherTenantError,
    OperationRecord,
    OperationUpdate,
    ReplicaRecord,
    RequestIdConflictError,
    check_lease_args,
    check_session_state_args,
)

# One page-token format for both backends (where the page ended, and the filter it belongs to).
from server.jobs.store.rows import decode_token, encode_token
from server.jobs.store.sqlite_schema import _from_us, _to_us

__all__ = ["SCHEMA_VERSION", "PostgresJobStore"]

T = TypeVar("T")

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_UNFINISHED = ", ".join(str(int(s)) for s in UNFINISHED_STATES)
_TERMINAL = ", ".join(str(int(s)) for s in TERMINAL_STATES)
_O_COLUMNS = qualified(OP_COLUMNS, "o")
# Unfinished and held by no live lease: waiting for a lane (claim_next's condition).
def _waiting(alias: str = "") -> str:
    a = f"{alias}." if alias else ""
    return f"{a}state IN ({_UNFINISHED}) AND ({a}lease_expire_time IS NULL OR {a}lease_expire_time <= clock_timestamp())"


_WAITING = _waiting()

# SQLSTATEs that mean "the server is not there now" rather than "this statement is wrong":
# class 08 (connection exceptions), admin/crash shutdown, and "cannot connect now" (starting up
# or in recovery). A connection failure before any SQLSTATE arrives has none.
_UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, PoolTimeout):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith("08") or state in _UNAVAILABLE_STATES
    return False


class PostgresJobStore(PostgresApiKeys, PostgresQuotaMethods):
    """The PostgreSQL `JobStore`. ``PostgresJobStore(url)`` with a libpq URL
    (``postgresql://user:password@host:port/database``; libpq's parameters such as
    ``sslmode`` or ``options=-csearch_path%3Dmyschema`` work as usual); ``await open()``
    connects and applies the migrations this database lacks."""

    shared_by_replicas = True  # see JobStore.shared_by_replicas

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout_s: float = 5.0,
        acquire_timeout_s: float = 10.0,
        probe_interval_s: float = 0.5,
    ) -> None:
        self.url = url
        params = conninfo_to_dict(url)  # ProgrammingError for a malformed URL, before any I/O
        self._connect_kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            # libpq's connect_timeout is whole seconds (at least 2).
            self._connect_kwargs["connect_timeout"] = max(2, round(connect_timeout_s))
        self._min_connections = min_connections
        self._max_connections = max_connections
        self._acquire_timeout_s = acquire_timeout_s
        self._open_timeout_s = acquire_timeout_s + connect_timeout_s
        self._probe_interval_s = probe_interval_s
        self._pool = self._new_pool()
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False
        # Set while the server is unreachable: calls fail at once instead of each waiting
        # acquire_timeout_s for a connection, until the recovery task has a working pool again.
        self._down_reason: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # try_cluster_duty's connections, one per duty this replica holds (their advisory locks).
        self._duty_conns: dict[str, AsyncConnection[Any]] = {}
        self._notifications = NotificationListeners()
        self._listener: PostgresListener | None = None

    def listen(self, callback: Callable[[Notification], None]) -> Callable[[], None]:
        """JobStore.listen: the first listener starts this store's one LISTEN connection
        (postgres_listen.py), which reconnects by itself and sends RESYNC on every connect."""
        remove = self._notifications.add(callback)
        if self._listener is None and not self._closed:
            self._listener = PostgresListener(self.url, self._connect_kwargs, self._notifications)
            self._listener.start()
        return remove

    @property
    def listener(self) -> PostgresListener | None:
        """The LISTEN connection, once a listener started it (tests wait on ``connected``)."""
        return self._listener

    def _new_pool(self) -> AsyncConnectionPool:
        return AsyncConnectionPool(
            self.url,
            min_size=self._min_connections,
            max_size=self._max_connections,
            kwargs=self._connect_kwargs,
            timeout=self._acquire_timeout_s,
            open=False,
            name="framewise-job-store",
        )

    # -- plumbing -----------------------------------------------------------------------------

    async def open(self) -> PostgresJobStore:
        async with self._open_lock:
            if self._closed:
                raise RuntimeError("job store is closed")
            if not self._opened:
                try:
                    await self._pool.open(wait=True, timeout=self._open_timeout_s)
                except PoolTimeout as exc:
                    await self._pool.close()
                    raise JobStoreUnavailableError(
                        f"could not connect to the PostgreSQL job store within {self._open_timeout_s:g} s: {exc}"
                    ) from exc
                try:
                    await self._migrate()
                except BaseException:
                    await self._pool.close()
                    raise
                self._opened = True
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        for conn in self._duty_conns.values():
            await conn.close()  # frees the duties' locks for another replica
        self._duty_conns.clear()
        await self._pool.close()

    @property
    def unavailable_reason(self) -> str | None:
        """Why the store cannot reach PostgreSQL now (None: it can), for health reporting."""
        return self._down_reason

    async def _migrate(self) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            # Held until COMMIT: replicas starting together apply each migration once.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(SCHEMA_MIGRATIONS_DDL)
            row = await (await conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")).fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the PostgreSQL job store has schema version {current}, newer than this code's {SCHEMA_VERSION}"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                migration = MIGRATIONS[version - 1]
                await conn.execute(migration.sql.encode())  # bytes: one simple-protocol script
                await conn.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                    (version, migration.description),
                )

    async def schema_version(self) -> int:
        row = await self._fetchone("SELECT coalesce(max(version), 0) FROM schema_migrations", (), read=True)
        return int(row[0]) if row else 0

    async def _call(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]], *, read: bool) -> T:
        """Runs ``fn`` on a pooled connection; connection-level failures become
        JobStoreUnavailableError (a read gets one more try on a fresh connection first)."""
        if not self._opened:
            await self.open()
        attempts = 2 if read else 1
        for attempt in range(attempts):
            if self._down_reason is not None:
                raise JobStoreUnavailableError(f"the PostgreSQL job store is unavailable: {self._down_reason}")
            try:
                async with self._pool.connection() as conn:
                    return await fn(conn)
            except (psycopg.Error, PoolTimeout) as exc:
                if not _is_unavailable(exc):
                    raise
                await self._connection_failed(exc)
                # Not after PoolTimeout: that read already waited acquire_timeout_s.
                if attempt + 1 < attempts and not isinstance(exc, PoolTimeout):
                    continue
                raise JobStoreUnavailableError(f"the PostgreSQL job store is unavailable: {exc}") from exc
        raise AssertionError("unreachable")

    async def _connection_failed(self, exc: BaseException) -> None:
        """One connection broke, or none could be had: is the server itself gone?"""
        if self._down_reason is not None or self._closed:
            return
        try:
            probe = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs)
        except psycopg.Error as probe_exc:
            self._down_reason = str(probe_exc).strip().splitlines()[0] if str(probe_exc).strip() else repr(probe_exc)
            log.warning("PostgreSQL job store unreachable; failing calls until it is back", extra={"error": str(exc)})
            self._spawn(self._recover())
            return
        await probe.close()
        # The server is there (it restarted, or ended this one connection): drop every idle
        # connection that died with the old server now, rather than fail one call per connection.
        self._spawn(self._pool.check())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self) -> None:
        """While the server is down: the old pool is closed (its reconnection attempts back off
        to many seconds, and log every failure); every probe_interval_s one plain connection is
        tried, and once one connects a new pool replaces the old."""
        old, self._pool = self._pool, self._new_pool()
        await old.close(timeout=1.0)
        while not self._closed:
            try:
                probe = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs)
            except psycopg.Error:
                await asyncio.sleep(self._probe_interval_s)
                continue
            await probe.close()
            candidate = self._new_pool()
            try:
                await candidate.open(wait=True, timeout=self._open_timeout_s)
            except PoolTimeout:
                await candidate.close(timeout=1.0)
                continue
            spare, self._pool = self._pool, candidate
            await spare.close(timeout=1.0)
            log.info("PostgreSQL job store reachable again")
            self._down_reason = None
            return

    async def _fetchone(self, sql: str, params: Iterable[Any], *, read: bool = False) -> tuple[Any, ...] | None:
        async def q(conn: AsyncConnection[Any]) -> tuple[Any, ...] | None:
            return await (await conn.execute(sql, tuple(params), binary=True)).fetchone()

        return await self._call(q, read=read)

    async def _fetchall(self, sql: str, params: Iterable[Any], *, read: bool = False) -> list[tuple[Any, ...]]:
        async def q(conn: AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            return await (await conn.execute(sql, tuple(params), binary=True)).fetchall()

        return await self._call(q, read=read)

    async def _refusal(self, name: str, epoch: int | None) -> JobStoreError:
        """Why a fenced statement matched no row: the operation is gone, or its lease moved on."""
        row = await self._fetchone(
            "SELECT lease_epoch, lease_owner FROM operations WHERE name = %s", (name,), read=True
        )
        if row is None:
            return OperationNotFoundError(name)
        if epoch is not None and row[0] != epoch:
            return LeaseLostError(name, epoch, row[0], row[1])
        return JobStoreError(f"operation {shown(name)} changed while it was being written; try again")

    # -- operations -----------------------------------------------------------------------------

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
        sql = f"""
            WITH op AS (
                INSERT INTO operations (name, kind, state, stage, message, create_time, update_time, request_id, tenant)
                SELECT %s, %s, {int(JobState.QUEUED)}, %s, %s, t.now, t.now, %s, %s
                FROM (SELECT clock_timestamp() AS now) t
                ON CONFLICT (tenant, request_id) DO NOTHING
                RETURNING {OP_COLUMNS}
            ), req AS (
                INSERT INTO operation_requests (name, request) SELECT name, %s FROM op
            )
            SELECT {OP_COLUMNS} FROM op, LATERAL (SELECT pg_notify('{JOBS_CHANNEL}', 'queued:' || op.name)) n
        """
        # A repeat whose first creation is being deleted at this very moment finds neither: retry.
        for _ in range(3):
            name = f"operations/{uuid.uuid4().hex}"
            row = await self._fetchone(sql, (name, int(kind), int(stage), message, request_id, tenant, bytes(request)))
            if row is not None:
                return op_from_row(row), True
            assert request_id is not None  # without a request_id nothing can conflict
            existing = await self.find_request(request_id, kind, tenant=tenant)
            if existing is not None:
                return existing, False
        raise JobStoreError(f"request_id {shown(request_id)} kept changing while it was being created; try again")

    async def find_request(self, request_id: str, kind: int, *, tenant: str = DEFAULT_TENANT) -> OperationRecord | None:
        row = await self._fetchone(
            f"SELECT {OP_COLUMNS} FROM operations WHERE tenant = %s AND request_id = %s", (tenant, request_id), read=True
        )
        if row is None:
            return None
        existing = op_from_row(row)
        if existing.kind != kind:
            raise RequestIdConflictError(f"request_id {shown(request_id)} was used for {existing.name} of another kind")
        return existing

    async def get_operation(self, name: str, *, tenant: str | None = None) -> OperationRecord:
        row = await self._fetchone(f"SELECT {OP_COLUMNS} FROM operations WHERE name = %s", (name,), read=True)
        if row is None:
            raise OperationNotFoundError(name)
        op = op_from_row(row)
        if tenant is not None and op.tenant != tenant:
            raise OtherTenantError(name)
        return op

    async def get_request(self, name: str) -> bytes:
        row = await self._fetchone("SELECT request FROM operation_requests WHERE name = %s", (name,), read=True)
        if row is not None:
            return bytes(row[0])
        op = await self.get_operation(name)  # OperationNotFoundError for an unknown name
        if not op.state.is_terminal:
            # Never written that way; an empty request would parse as a valid default one.
            raise JobStoreError(f"{name} is {op.state.name} but its request is not stored")
        return b""  # finished: dropped with the terminal state

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
            where.append("state = ANY(%s)")
            params.append(state_list)
        # The filter as the token records it (state order does not matter); the tenant too, so
        # a token never continues another tenant's listing.
        scope = [None if state_list is None else sorted(set(state_list)), None if kind is None else int(kind), tenant]
        if kind is not None:
            where.append("kind = %s")
            params.append(int(kind))
        if tenant is not None:
            where.append("tenant = %s")
            params.append(tenant)
        if page_token:
            after_us, after_name = decode_token(page_token, scope)
            where.append("(create_time, name) > (%s, %s)")
            params.extend([_from_us(after_us), after_name])
        sql = f"SELECT {OP_COLUMNS} FROM operations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY create_time, name LIMIT %s"
        params.append(size + 1)
        rows = [op_from_row(r) for r in await self._fetchall(sql, params, read=True)]
        if len(rows) <= size:
            return rows, ""
        items = rows[:size]
        last = items[-1]
        return items, encode_token(_to_us(last.create_time), last.name, scope)

    @staticmethod
    def _assignments(update: OperationUpdate) -> tuple[list[str], list[Any]]:
        """SET clauses (on ``operations o``, with ``t.now`` the statement's time) and their
        parameters, in order."""
        sets: list[str] = []
        params: list[Any] = []
        if update.state is not None:
            state = JobState(update.state)
            sets.append("state = %s")
            params.append(int(state))
            if state == JobState.RUNNING and update.start_time is None:
                sets.append("start_time = coalesce(o.start_time, t.now)")
            if state.is_terminal and update.end_time is None:
                sets.append("end_time = coalesce(o.end_time, t.now)")
        for attr, column, conv in (
            ("stage", "stage", int),
            ("percent", "percent", float),
            ("message", "message", str),
            ("response", "response", bytes),
            ("last_completed_stage", "last_completed_stage", int),
            ("start_time", "start_time", _checked_time),
            ("end_time", "end_time", _checked_time),
        ):
            value = getattr(update, attr)
            if value is not None:
                sets.append(f"{column} = %s")
                params.append(conv(value))
        if update.error is not None:
            code, msg = update.error
            sets += ["error_code = %s", "error_message = %s"]
            params += [int(code), str(msg)]
        return sets, params

    @staticmethod
    def _drops_request(update: OperationUpdate | None) -> bool:
        return update is not None and update.state is not None and JobState(update.state).is_terminal

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
        sets, params = self._assignments(update)
        fence = ""
        if epoch is not None:
            fence = " AND o.lease_epoch = %s"
        # See JobStore.get_request: a finished operation's request is dropped with it.
        drop = (
            ", gone AS (DELETE FROM operation_requests WHERE name IN (SELECT name FROM op))"
            if self._drops_request(update)
            else ""
        )
        sql = f"""
            WITH t AS (SELECT clock_timestamp() AS now), op AS (
                UPDATE operations o SET {", ".join(["update_time = t.now", *sets])}
                FROM t WHERE o.name = %s{fence}
                RETURNING {_O_COLUMNS}
            ){drop}
            SELECT {OP_COLUMNS} FROM op
        """
        row = await self._fetchone(sql, [*params, name, *([] if epoch is None else [int(epoch)])])
        if row is None:
            raise await self._refusal(name, epoch)
        return op_from_row(row)

    async def request_cancel(self, name: str, *, tenant: str | None = None) -> OperationRecord:
        if tenant is not None:
            await self.get_operation(name, tenant=tenant)  # OtherTenantError: nothing is set
        row = await self._fetchone(
            f"WITH c AS (UPDATE operations SET cancel_requested = true, update_time = clock_timestamp() "
            f"WHERE name = %s AND state IN ({_UNFINISHED}) AND NOT cancel_requested RETURNING {OP_COLUMNS}) "
            f"SELECT {OP_COLUMNS} FROM c, LATERAL (SELECT pg_notify('{JOBS_CHANNEL}', 'cancel:' || c.name)) n",
            (name,),
        )
        if row is not None:
            return op_from_row(row)
        return await self.get_operation(name)  # finished or already requested: as it is

    async def delete_operation(self, name: str, *, tenant: str | None = None) -> list[str]:
        if tenant is not None:
            # An operation never changes tenant, so checking first leaves no window.
            await self.get_operation(name, tenant=tenant)  # OtherTenantError: nothing is deleted
        # The SELECT reads the statement's snapshot, taken before the DELETE (and its cascade to
        # events, artifacts and the request) runs: it still sees the artifact rows.
        row = await self._fetchone(
            f"""
            WITH d AS (DELETE FROM operations WHERE name = %s AND state IN ({_TERMINAL}) RETURNING name)
            SELECT (SELECT count(*) FROM d),
                   array(SELECT a.path FROM artifacts a WHERE a.operation IN (SELECT name FROM d) ORDER BY a.name)
            """,
            (name,),
        )
        if row is not None and row[0] == 1:
            return list(row[1])
        op = await self.get_operation(name)  # OperationNotFoundError
        raise OperationNotFinishedError(name, op.state)

    async def finished_before(self, cutoff: datetime, limit: int = 500) -> list[str]:
        rows = await self._fetchall(
            f"SELECT name FROM operations WHERE state IN ({_TERMINAL}) AND end_time < %s "
            "ORDER BY end_time, name LIMIT %s",
            (_checked_time(cutoff), max(1, int(limit))),
            read=True,
        )
        return [r[0] for r in rows]

    async def unfinished_operations(self) -> list[OperationRecord]:
        rows = await self._fetchall(
            f"SELECT {OP_COLUMNS} FROM operations WHERE state IN ({_UNFINISHED}) ORDER BY create_time, name",
            (),
            read=True,
        )
        return [op_from_row(r) for r in rows]

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
        sets, params = (self._assignments(update)) if update is not None else ([], [])
        fence = " AND o.lease_epoch = %s" if epoch is not None else ""
        drop = (
            ", gone AS (DELETE FROM operation_requests WHERE name IN (SELECT name FROM op))"
            if self._drops_request(update)
            else ""
        )
        # The UPDATE locks the operation row: a concurrent appender of the same operation waits
        # and then reads the bumped last_sequence. The event's time is the operation's new
        # update_time.
        sql = f"""
            WITH t AS (SELECT clock_timestamp() AS now), op AS (
                UPDATE operations o
                SET {", ".join(["last_sequence = o.last_sequence + 1", "update_time = t.now", *sets])}
                FROM t WHERE o.name = %s{fence}
                RETURNING o.name, o.last_sequence, o.update_time
            ){drop}, ev AS (
                INSERT INTO events (operation, sequence, time, event_type, terminal, payload)
                SELECT name, last_sequence, update_time, %s, %s, %s FROM op
                RETURNING {EVENT_COLUMNS}
            )
            SELECT {EVENT_COLUMNS} FROM ev,
                LATERAL (SELECT pg_notify('{EVENTS_CHANNEL}', ev.operation || ':' || ev.sequence)) n
        """
        row = await self._fetchone(
            sql, [*params, name, *([] if epoch is None else [int(epoch)]), event_type, is_terminal, payload]
        )
        if row is None:
            raise await self._refusal(name, epoch)
        return event_from_row(row)

    async def events_after(self, name: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        rows = await self._fetchall(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE operation = %s AND sequence > %s ORDER BY sequence LIMIT %s",
            (name, int(after_sequence), max(1, int(limit))),
            read=True,
        )
        return [event_from_row(r) for r in rows]

    # -- artifacts ------------------------------------------------------------------------------

    async def add_artifact(self, artifact: ArtifactRecord, *, epoch: int | None = None) -> ArtifactRecord:
        a = artifact
        fence = " AND lease_epoch = %s" if epoch is not None else ""
        # FOR SHARE: a claim (which updates the row) waits for this insert to commit, or this
        # statement waits for the claim and then sees the new epoch.
        row = await self._fetchone(
            f"""
            WITH op AS (SELECT name FROM operations WHERE name = %s{fence} FOR SHARE)
            INSERT INTO artifacts ({ARTIFACT_COLUMNS})
            SELECT op.name, %s, %s, %s, %s, %s, %s, %s FROM op
            ON CONFLICT (operation, name) DO UPDATE SET kind = excluded.kind,
                media_type = excluded.media_type, path = excluded.path, size = excluded.size,
                sha256 = excluded.sha256, expire_time = excluded.expire_time
            RETURNING 1
            """,
            (
                a.operation,
                *([] if epoch is None else [int(epoch)]),
                a.name,
                int(a.kind),
                a.media_type,
                str(a.path),
                int(a.size),
                a.sha256,
                None if a.expire_time is None else _checked_time(a.expire_time),
            ),
        )
        if row is None:
            raise await self._refusal(a.operation, epoch)
        return a

    async def list_artifacts(self, name: str, *, tenant: str | None = None) -> list[ArtifactRecord]:
        sql = f"SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE operation = %s"
        params: tuple[str, ...] = (name,)
        if tenant is not None:
            sql += " AND operation IN (SELECT name FROM operations WHERE name = %s AND tenant = %s)"
            params = (name, name, tenant)
        rows = await self._fetchall(sql + " ORDER BY name", params, read=True)
        return [artifact_from_row(r) for r in rows]

    async def tenant_usage(self, tenant: str) -> tuple[list[str], int, int]:
        names = await self._fetchall("SELECT name FROM operations WHERE tenant = %s ORDER BY name", (tenant,), read=True)
        row = await self._fetchone(
            "SELECT count(*), coalesce(sum(a.size), 0) FROM artifacts a JOIN operations o ON o.name = a.operation "
            "WHERE o.tenant = %s",
            (tenant,),
            read=True,
        )
        assert row is not None
        return [r[0] for r in names], int(row[0]), int(row[1])

    # -- leases ---------------------------------------------------------------------------------

    async def claim_next(
        self, replica_id: str, lease_s: float, *, skip: Collection[str] = ()
    ) -> OperationRecord | None:
        check_lease_args(replica_id, lease_s)
        row = await self._fetchone(
            f"""
            WITH next AS (
                SELECT name FROM operations
                WHERE state IN ({_UNFINISHED})
                  AND (lease_expire_time IS NULL OR lease_expire_time <= clock_timestamp())
                  AND name <> ALL(%s::text[])
                ORDER BY create_time, name
                LIMIT 1
                FOR UPDATE SKIP LOCKED
            )
            UPDATE operations o
            SET lease_owner = %s, lease_epoch = o.lease_epoch + 1,
                lease_expire_time = clock_timestamp() + %s * interval '1 second'
            FROM next WHERE o.name = next.name
            RETURNING {_O_COLUMNS}
            """,
            (list(skip), replica_id, float(lease_s)),
        )
        return None if row is None else op_from_row(row)

    async def renew_lease(self, name: str, replica_id: str, epoch: int, lease_s: float) -> OperationRecord:
        check_lease_args(replica_id, lease_s)
        row = await self._fetchone(
            f"""
            UPDATE operations SET lease_expire_time = clock_timestamp() + %s * interval '1 second'
            WHERE name = %s AND lease_owner = %s AND lease_epoch = %s AND state IN ({_UNFINISHED})
            RETURNING {OP_COLUMNS}
            """,
            (float(lease_s), name, replica_id, int(epoch)),
        )
        if row is not None:
            return op_from_row(row)
        op = await self.get_operation(name)  # OperationNotFoundError
        raise LeaseLostError(name, epoch, op.lease_epoch, op.lease_owner)

    async def release_lease(self, name: str, replica_id: str, epoch: int) -> None:
        await self._fetchone(
            "WITH r AS (UPDATE operations SET lease_owner = NULL, lease_expire_time = NULL "
            "WHERE name = %s AND lease_owner = %s AND lease_epoch = %s RETURNING name) "
            f"SELECT 1 FROM r, LATERAL (SELECT pg_notify('{JOBS_CHANNEL}', 'released:' || r.name)) n",
            (name, replica_id, int(epoch)),
        )

    # -- the engine's view ------------------------------------------------------------------------

    async def count_waiting(self) -> int:
        row = await self._fetchone(f"SELECT count(*) FROM operations WHERE {_WAITING}", (), read=True)
        return int(row[0]) if row else 0

    async def waiting_position(self, name: str) -> int:
        row = await self._fetchone(
            f"""
            SELECT (SELECT count(*) FROM operations o WHERE {_waiting("o")}
                      AND (o.create_time, o.name) < (me.create_time, me.name))
            FROM operations me WHERE me.name = %s AND {_waiting("me")}
            """,
            (name,),
            read=True,
        )
        return -1 if row is None else int(row[0])

    async def try_cluster_duty(self, duty: str) -> bool:
        """A session-level advisory lock on a connection of its own (not the pool's: a pooled
        connection goes back to the pool, and the lock with it). Held until this store closes
        or the connection dies, when PostgreSQL frees the lock and another replica takes it."""
        if not self._opened:
            await self.open()
        conn = self._duty_conns.get(duty)
        if conn is not None:
            try:
                await conn.execute("SELECT 1")
                return True
            except psycopg.Error:
                self._duty_conns.pop(duty, None)
                await conn.close()
        key = int.from_bytes(hashlib.sha256(f"framewise duty {duty}".encode()).digest()[:8], "big", signed=True)
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **self._connect_kwargs)
        except psycopg.Error as exc:
            raise JobStoreUnavailableError(f"the PostgreSQL job store is unavailable: {exc}") from exc
        try:
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))).fetchone()
        except psycopg.Error as exc:
            await conn.close()
            raise JobStoreUnavailableError(f"the PostgreSQL job store is unavailable: {exc}") from exc
        if row is None or not row[0]:
            await conn.close()
            return False
        self._duty_conns[duty] = conn
        return True

    # -- replicas -------------------------------------------------------------------------------

    async def register_replica(self, replica_id: str, address: str) -> ReplicaRecord:
        if not replica_id:
            raise ValueError("replica_id must not be empty")
        row = await self._fetchone(
            f"""
            -- One clock reading for both columns: two clock_timestamp() calls may differ by a
            -- microsecond, and a new registration's heartbeat must equal its registration.
            INSERT INTO replicas (replica_id, address, register_time, heartbeat_time)
            SELECT %s, %s, t, t FROM (SELECT clock_timestamp() AS t) AS now
            ON CONFLICT (replica_id) DO UPDATE SET address = excluded.address, heartbeat_time = excluded.heartbeat_time
            RETURNING {REPLICA_COLUMNS}
            """,
            (replica_id, address),
        )
        assert row is not None  # an upsert always returns its row
        return replica_from_row(row)

    async def list_replicas(self, *, seen_within_s: float | None = None) -> list[ReplicaRecord]:
        if seen_within_s is None:
            rows = await self._fetchall(f"SELECT {REPLICA_COLUMNS} FROM replicas ORDER BY replica_id", (), read=True)
        else:
            rows = await self._fetchall(
                f"SELECT {REPLICA_COLUMNS} FROM replicas "
                "WHERE heartbeat_time >= clock_timestamp() - %s * interval '1 second' ORDER BY replica_id",
                (float(seen_within_s),),
                read=True,
            )
        return [replica_from_row(r) for r in rows]

    # -- tracking sessions handed off -------------------------------------------------------------

    async def put_session_state(self, key: str, state: bytes, ttl_s: float, *, tenant: str = DEFAULT_TENANT) -> None:
        check_session_state_args(key, ttl_s)

        async def tx(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM tracking_sessions WHERE expire_time <= clock_timestamp()")
                await conn.execute(
                    "INSERT INTO tracking_sessions (tenant, session_key, state, expire_time) "
                    "VALUES (%s, %s, %s, clock_timestamp() + %s * interval '1 second') "
                    "ON CONFLICT (tenant, session_key) DO UPDATE SET state = excluded.state, expire_time = excluded.expire_time",
                    (tenant, key, bytes(state), float(ttl_s)),
                    binary=True,
                )

        await self._call(tx, read=False)

    async def take_session_state(self, key: str, *, tenant: str = DEFAULT_TENANT) -> bytes | None:
        # DELETE ... RETURNING: of two replicas taking the key at once, the second's DELETE
        # waits on the first's row lock and then matches nothing.
        row = await self._fetchone(
            "DELETE FROM tracking_sessions WHERE tenant = %s AND session_key = %s "
            "RETURNING state, expire_time > clock_timestamp()",
            (tenant, key),
        )
        if row is None or not row[1]:
            return None
        return bytes(row[0])


def _checked_time(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("naive datetime; job store times must be timezone-aware")
    return t
