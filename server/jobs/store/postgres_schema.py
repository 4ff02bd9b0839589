"""The PostgreSQL job store's schema, its versioned migrations and the row <-> record mapping.

Migrations are an ordered list; ``schema_migrations`` records each one applied (version,
description, when). They run in one transaction under a transaction-scoped advisory lock
(``MIGRATION_LOCK``), so N replicas starting at once against an empty database migrate it
exactly once: the first takes the lock and applies everything, the others wait for its commit
and find nothing left to do. A migration must be transactional DDL (PostgreSQL's is), never
``CREATE INDEX CONCURRENTLY``.

The tables mirror the SQLite store's (server/jobs/store/sqlite_schema.py at its version 3):
the same columns with native types (``timestamptz`` with microseconds instead of integer
microseconds, ``bytea``, ``boolean``), and the submit request in its own table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.jobs.store import rows
from server.jobs.store.protocol import ArtifactRecord, EventRecord, OperationRecord, ReplicaRecord

__all__ = [
    "ARTIFACT_COLUMNS",
    "EVENT_COLUMNS",
    "MIGRATIONS",
    "MIGRATION_LOCK",
    "OP_COLUMNS",
    "SCHEMA_VERSION",
    "Migration",
    "artifact_from_row",
    "event_from_row",
    "op_from_row",
    "replica_from_row",
]


@dataclass(frozen=True)
class Migration:
    description: str
    sql: str


MIGRATIONS: list[Migration] = [
    Migration(
        "operations, their requests, events and artifacts, with leases",
        """
        -- fillfactor 80: an event's UPDATE of its operation (last_sequence, update_time: no
        -- index covers them) finds room in the same page and stays a HOT update, so it writes
        -- no index entries.
        CREATE TABLE operations (
            name                 text PRIMARY KEY,
            kind                 integer NOT NULL,
            state                smallint NOT NULL,
            stage                integer NOT NULL DEFAULT 0,
            percent              double precision NOT NULL DEFAULT 0,
            message              text NOT NULL DEFAULT '',
            response             bytea,
            error_code           integer,
            error_message        text,
            create_time          timestamptz NOT NULL,
            update_time          timestamptz NOT NULL,
            start_time           timestamptz,
            end_time             timestamptz,
            last_sequence        bigint NOT NULL DEFAULT 0,
            last_completed_stage integer NOT NULL DEFAULT 0,
            request_id           text UNIQUE,
            cancel_requested     boolean NOT NULL DEFAULT false,
            lease_owner          text,
            lease_epoch          bigint NOT NULL DEFAULT 0,
            lease_expire_time    timestamptz
        ) WITH (fillfactor = 80);
        CREATE INDEX operations_by_create ON operations (create_time, name);
        CREATE INDEX operations_by_state ON operations (state, create_time, name);
        -- Claiming and restart walk the unfinished ones (states 1-2) only; retention the
        -- finished ones (3-5) by end time.
        CREATE INDEX operations_unfinished ON operations (create_time, name) WHERE state IN (1, 2);
        CREATE INDEX operations_finished ON operations (end_time, name) WHERE state IN (3, 4, 5);

        -- The submit request (an inline photo and audio: up to tens of MB), out of the hot row.
        -- STORAGE EXTERNAL: stored out of line without trying to compress media that is
        -- compressed already.
        CREATE TABLE operation_requests (
            name    text PRIMARY KEY REFERENCES operations (name) ON DELETE CASCADE,
            request bytea NOT NULL
        );
        ALTER TABLE operation_requests ALTER COLUMN request SET STORAGE EXTERNAL;

        CREATE TABLE events (
            operation  text NOT NULL REFERENCES operations (name) ON DELETE CASCADE,
            sequence   bigint NOT NULL,
            time       timestamptz NOT NULL,
            event_type text NOT NULL,
            terminal   boolean NOT NULL DEFAULT false,
            payload    bytea NOT NULL,
            PRIMARY KEY (operation, sequence)
        );

        CREATE TABLE artifacts (
            operation   text NOT NULL REFERENCES operations (name) ON DELETE CASCADE,
            name        text NOT NULL,
            kind        integer NOT NULL,
            media_type  text NOT NULL,
            path        text NOT NULL,
            size        bigint NOT NULL,
            sha256      text NOT NULL,
            expire_time timestamptz,
            PRIMARY KEY (operation, name)
        );
        """,
    ),
    Migration(
        "replicas and their heartbeats",
        """
        -- One row per replica (--replica-id); every replica renews its heartbeat_time every few
        -- seconds, so `framewise info` can tell the live ones from those gone.
        CREATE TABLE replicas (
            replica_id     text PRIMARY KEY,
            address        text NOT NULL,
            register_time  timestamptz NOT NULL,
            heartbeat_time timestamptz NOT NULL
        );
        """,
    ),
    Migration(
        "tracking sessions handed off by draining replicas",
        """
        -- A draining replica writes each live tracking session's state here; the replica a
        -- resume reaches takes it (DELETE ... RETURNING: one taker). A few MiB per session:
        -- STORAGE EXTERNAL, float arrays do not compress.
        CREATE TABLE tracking_sessions (
            session_key text PRIMARY KEY,
            state       bytea NOT NULL,
            expire_time timestamptz NOT NULL
        );
        ALTER TABLE tracking_sessions ALTER COLUMN state SET STORAGE EXTERNAL;
        CREATE INDEX tracking_sessions_by_expiry ON tracking_sessions (expire_time);
        """,
    ),
    # Version 4.
    Migration(
        "tenancy: operations and handed-off tracking sessions owned by a tenant",
        """
        -- Every operation belongs to a tenant (rows written before: 'default'); a request_id is
        -- unique per tenant, not across tenants (NULLs stay distinct: no key, no conflict).
        ALTER TABLE operations ADD COLUMN tenant text NOT NULL DEFAULT 'default';
        ALTER TABLE operations DROP CONSTRAINT operations_request_id_key;
        ALTER TABLE operations ADD CONSTRAINT operations_tenant_request_id_key UNIQUE (tenant, request_id);
        CREATE INDEX operations_by_tenant ON operations (tenant, create_time, name);
        -- A handed-off session's key is unique per tenant: another tenant's resume of the same
        -- key finds nothing (and takes nothing).
        ALTER TABLE tracking_sessions ADD COLUMN tenant text NOT NULL DEFAULT 'default';
        ALTER TABLE tracking_sessions DROP CONSTRAINT tracking_sessions_pkey;
        ALTER TABLE tracking_sessions ADD PRIMARY KEY (tenant, session_key);
        """,
    ),
    Migration(
        "API keys",
        """
        -- server/auth/keys.py: the SHA-256 of each key, never the key, with its tenant, scopes
        -- (space-separated), expiry, revocation and last use. Rows are never deleted: a revoked
        -- key stays listed, and `--auth auto` keeps requiring credentials.
        CREATE TABLE api_keys (
            key_id         text PRIMARY KEY,
            tenant         text NOT NULL,
            scopes         text NOT NULL,
            secret_hash    text NOT NULL,
            create_time    timestamptz NOT NULL,
            expire_time    timestamptz,
            revoke_time    timestamptz,
            last_used_time timestamptz
        );
        CREATE INDEX api_keys_by_tenant ON api_keys (tenant, create_time);
        """,
    ),
    # Version 6.
    Migration(
        "per-tenant quotas: overrides and session slots",
        """
        -- server/quotas/: the overrides of the flag defaults, one row per tenant and quota name
        -- (a quota without a row takes the default).
        CREATE TABLE tenant_quotas (
            tenant      text NOT NULL,
            quota       text NOT NULL,
            value       double precision NOT NULL,
            update_time timestamptz NOT NULL,
            PRIMARY KEY (tenant, quota)
        );
        -- The slots of counted resources that live in one replica's memory (tracking
        -- sessions): renewed by the replica holding them, lapsing when it stops, so every
        -- replica counts a tenant's sessions the same. Acquiring takes an advisory lock per
        -- (resource, tenant), so replicas cannot both take the last slot.
        CREATE TABLE quota_leases (
            resource    text NOT NULL,
            tenant      text NOT NULL,
            lease_key   text NOT NULL,
            holder      text NOT NULL,
            expire_time timestamptz NOT NULL,
            PRIMARY KEY (resource, tenant, lease_key)
        );
        CREATE INDEX quota_leases_by_holder ON quota_leases (resource, holder);
        -- A tenant's queued and running jobs (its jobs quota), counted without walking its
        -- finished ones.
        CREATE INDEX operations_unfinished_by_tenant ON operations (tenant) WHERE state IN (1, 2);
        """,
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

# The advisory lock key migrations hold (any constant the database's other users do not use):
# "FWJS" in ASCII.
MIGRATION_LOCK = 0x46574A53

SCHEMA_MIGRATIONS_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

OP_COLUMNS = (
    "name, kind, state, stage, percent, message, response, error_code, error_message, "
    "create_time, update_time, start_time, end_time, last_sequence, last_completed_stage, request_id, "
    "cancel_requested, lease_owner, lease_epoch, lease_expire_time, tenant"
)
EVENT_COLUMNS = "operation, sequence, time, event_type, payload, terminal"
ARTIFACT_COLUMNS = "operation, name, kind, media_type, path, size, sha256, expire_time"
REPLICA_COLUMNS = "replica_id, address, register_time, heartbeat_time"


def qualified(columns: str, alias: str) -> str:
    """``"a, b"`` -> ``"o.a, o.b"`` (an UPDATE ... FROM must say whose columns it returns)."""
    return ", ".join(f"{alias}.{c.strip()}" for c in columns.split(","))


def _utc(t: datetime | None) -> datetime | None:
    # timestamptz comes back in the session's TimeZone; records are UTC whatever the server's.
    return None if t is None else t.astimezone(UTC)


def op_from_row(r: tuple[Any, ...]) -> OperationRecord:
    return rows.op_from_row(r, _utc)


def event_from_row(r: tuple[Any, ...]) -> EventRecord:
    return rows.event_from_row(r, _utc)


def artifact_from_row(r: tuple[Any, ...]) -> ArtifactRecord:
    return rows.artifact_from_row(r, _utc)


def replica_from_row(r: tuple[Any, ...]) -> ReplicaRecord:
    return rows.replica_from_row(r, _utc)
