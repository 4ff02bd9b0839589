"""The SQLite job store's schema, its migrations and the row <-> record mapping."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from server.jobs.store import rows
from server.jobs.store.protocol import ArtifactRecord, EventRecord, OperationRecord, ReplicaRecord

_MIGRATIONS: list[str] = [
    # Version 1.
    """
    CREATE TABLE operations (
        name                 TEXT PRIMARY KEY,
        kind                 INTEGER NOT NULL,
        state                INTEGER NOT NULL,
        stage                INTEGER NOT NULL DEFAULT 0,
        percent              REAL NOT NULL DEFAULT 0,
        message              TEXT NOT NULL DEFAULT '',
        request              BLOB NOT NULL,
        response             BLOB,
        error_code           INTEGER,
        error_message        TEXT,
        create_us            INTEGER NOT NULL,
        update_us            INTEGER NOT NULL,
        start_us             INTEGER,
        end_us               INTEGER,
        last_sequence        INTEGER NOT NULL DEFAULT 0,
        last_completed_stage INTEGER NOT NULL DEFAULT 0,
        request_id           TEXT UNIQUE,
        cancel_requested     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX operations_by_create ON operations (create_us, name);
    CREATE INDEX operations_by_state ON operations (state, create_us, name);

    CREATE TABLE events (
        operation  TEXT NOT NULL REFERENCES operations (name) ON DELETE CASCADE,
        sequence   INTEGER NOT NULL,
        time_us    INTEGER NOT NULL,
        event_type TEXT NOT NULL,
        terminal   INTEGER NOT NULL DEFAULT 0,
        payload    BLOB NOT NULL,
        PRIMARY KEY (operation, sequence)
    ) WITHOUT ROWID;

    CREATE TABLE artifacts (
        operation  TEXT NOT NULL REFERENCES operations (name) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        kind       INTEGER NOT NULL,
        media_type TEXT NOT NULL,
        path       TEXT NOT NULL,
        size       INTEGER NOT NULL,
        sha256     TEXT NOT NULL,
        expire_us  INTEGER,
        PRIMARY KEY (operation, name)
    ) WITHOUT ROWID;
    """,
    # Version 2: the submit request (an inline photo and audio: up to tens of MB) gets its own
    # table. In the operations row, every stage event's UPDATE rewrote it whole (SQLite rewrites
    # a row's overflow pages when its size changes, and the stage message changes it): 400 KB
    # written and fsynced per event of a talking video with a 200 KB photo, instead of ~12 KB.
    # Every GetOperation and watch subscription read it too. A finished operation's request is
    # not carried over (states 3-5: JobState's terminal ones).
    """
    CREATE TABLE operation_requests (
        name    TEXT PRIMARY KEY REFERENCES operations (name) ON DELETE CASCADE,
        request BLOB NOT NULL
    );
    INSERT INTO operation_requests (name, request)
        SELECT name, request FROM operations WHERE state NOT IN (3, 4, 5);
    ALTER TABLE operations DROP COLUMN request;
    """,
    # Version 3: leases (JobStore.claim_next). The epoch goes up at every claim and fences the
    # writes of a holder that lost its job. Claiming reads the unfinished operations (states
    # 1-2) through operations_by_state, however many finished ones the table holds.
    """
    ALTER TABLE operations ADD COLUMN lease_owner TEXT;
    ALTER TABLE operations ADD COLUMN lease_epoch INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE operations ADD COLUMN lease_expire_us INTEGER;
    """,
    # Version 4: replicas and their heartbeats (JobStore.register_replica). One replica on
    # SQLite, but `framewise info` lists it the same way as a cluster's.
    """
    CREATE TABLE replicas (
        replica_id   TEXT PRIMARY KEY,
        address      TEXT NOT NULL,
        register_us  INTEGER NOT NULL,
        heartbeat_us INTEGER NOT NULL
    ) WITHOUT ROWID;
    """,
    # Version 5: tracking sessions a draining replica handed off (JobStore.put_session_state), until a
    # resume takes them or they expire. A rowid table: a state is megabytes, and SQLite keeps
    # WITHOUT ROWID rows that large in its index b-tree pages, where they fit badly.
    """
    CREATE TABLE tracking_sessions (
        session_key TEXT PRIMARY KEY,
        state       BLOB NOT NULL,
        expire_us   INTEGER NOT NULL
    );
    CREATE INDEX tracking_sessions_by_expiry ON tracking_sessions (expire_us);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)

_OP_COLUMNS = (
    "name, kind, state, stage, percent, message, response, error_code, error_message, "
    "create_us, update_us, start_us, end_us, last_sequence, last_completed_stage, request_id, "
    "cancel_requested, lease_owner, lease_epoch, lease_expire_us"
)
_EVENT_COLUMNS = "operation, sequence, time_us, event_type, payload, terminal"
_ARTIFACT_COLUMNS = "operation, name, kind, media_type, path, size, sha256, expire_us"
_REPLICA_COLUMNS = "replica_id, address, register_us, heartbeat_us"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _to_us(t: datetime) -> int:
    if t.tzinfo is None:
        raise ValueError("naive datetime; job store times must be timezone-aware")
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _from_us(us: int | None) -> datetime | None:
    if us is None:
        return None
    return _EPOCH + timedelta(microseconds=us)


def _op_from_row(r: sqlite3.Row | tuple[Any, ...]) -> OperationRecord:
    return rows.op_from_row(r, _from_us)


def _event_from_row(r: tuple[Any, ...]) -> EventRecord:
    return rows.event_from_row(r, _from_us)


def _artifact_from_row(r: tuple[Any, ...]) -> ArtifactRecord:
    return rows.artifact_from_row(r, _from_us)


def _replica_from_row(r: tuple[Any, ...]) -> ReplicaRecord:
    return rows.replica_from_row(r, _from_us)


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
