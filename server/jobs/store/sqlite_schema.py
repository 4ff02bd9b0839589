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
    # Version 6: tenancy. Every operation belongs to a tenant (rows written before: "default"),
    # and a request_id is unique per tenant, not across tenants. The column-level UNIQUE on
    # request_id cannot be dropped without rebuilding `operations`, and a rebuild (DROP TABLE
    # under foreign keys) would cascade-delete every event and artifact: so the key moves to
    # tenant_request_id under a (tenant, tenant_request_id) unique index, and request_id stays,
    # always NULL. A handed-off tracking session is owned by its tenant too: its key is unique
    # per tenant (a transient table, rebuilt with its rows).
    """
    ALTER TABLE operations ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE operations ADD COLUMN tenant_request_id TEXT;
    UPDATE operations SET tenant_request_id = request_id, request_id = NULL WHERE request_id IS NOT NULL;
    CREATE UNIQUE INDEX operations_by_tenant_request ON operations (tenant, tenant_request_id);
    CREATE INDEX operations_by_tenant ON operations (tenant, create_us, name);
    CREATE TABLE tracking_sessions_v6 (
        tenant      TEXT NOT NULL,
        session_key TEXT NOT NULL,
        state       BLOB NOT NULL,
        expire_us   INTEGER NOT NULL,
        PRIMARY KEY (tenant, session_key)
    );
    INSERT INTO tracking_sessions_v6 (tenant, session_key, state, expire_us)
        SELECT 'default', session_key, state, expire_us FROM tracking_sessions;
    DROP TABLE tracking_sessions;
    ALTER TABLE tracking_sessions_v6 RENAME TO tracking_sessions;
    CREATE INDEX tracking_sessions_by_expiry ON tracking_sessions (expire_us);
    """,
    # Version 7: API keys (server/auth/keys.py): the SHA-256 of each key, never the key, with
    # its tenant, scopes (space-separated), expiry, revocation and last use. Rows are never
    # deleted: a revoked key stays listed, and `--auth auto` keeps requiring credentials.
    """
    CREATE TABLE api_keys (
        key_id       TEXT PRIMARY KEY,
        tenant       TEXT NOT NULL,
        scopes       TEXT NOT NULL,
        secret_hash  TEXT NOT NULL,
        create_us    INTEGER NOT NULL,
        expire_us    INTEGER,
        revoke_us    INTEGER,
        last_used_us INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX api_keys_by_tenant ON api_keys (tenant, create_us);
    """,
    # Version 8: per-tenant quotas (server/quotas/). tenant_quotas holds the overrides of the
    # flag defaults, one row per tenant and quota name (a quota without a row takes the
    # default). quota_leases holds the slots of counted resources that live in a replica's
    # memory (tracking sessions): one row per session, renewed by the replica that holds it and
    # lapsing when that replica stops, so every replica counts a tenant's sessions the same.
    """
    CREATE TABLE tenant_quotas (
        tenant    TEXT NOT NULL,
        quota     TEXT NOT NULL,
        value     REAL NOT NULL,
        update_us INTEGER NOT NULL,
        PRIMARY KEY (tenant, quota)
    ) WITHOUT ROWID;
    CREATE TABLE quota_leases (
        resource  TEXT NOT NULL,
        tenant    TEXT NOT NULL,
        lease_key TEXT NOT NULL,
        holder    TEXT NOT NULL,
        expire_us INTEGER NOT NULL,
        PRIMARY KEY (resource, tenant, lease_key)
    ) WITHOUT ROWID;
    CREATE INDEX quota_leases_by_holder ON quota_leases (resource, holder);
    -- A tenant's queued and running jobs (its jobs quota), counted without walking its finished ones.
    CREATE INDEX operations_unfinished_by_tenant ON operations (tenant) WHERE state IN (1, 2);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)

_OP_COLUMNS = (
    "name, kind, state, stage, percent, message, response, error_code, error_message, "
    "create_us, update_us, start_us, end_us, last_sequence, last_completed_stage, tenant_request_id, "
    "cancel_requested, lease_owner, lease_epoch, lease_expire_us, tenant"
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
