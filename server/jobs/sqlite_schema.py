"""The SQLite job store's schema, its migrations and the row <-> record mapping."""

from __future__ import annotations

import base64
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

from server.jobs.store import ArtifactRecord, EventRecord, JobState, OperationRecord

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
]
SCHEMA_VERSION = len(_MIGRATIONS)

_OP_COLUMNS = (
    "name, kind, state, stage, percent, message, request, response, error_code, error_message, "
    "create_us, update_us, start_us, end_us, last_sequence, last_completed_stage, request_id, "
    "cancel_requested"
)
_EVENT_COLUMNS = "operation, sequence, time_us, event_type, payload, terminal"
_ARTIFACT_COLUMNS = "operation, name, kind, media_type, path, size, sha256, expire_us"


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
    return OperationRecord(
        name=r[0],
        kind=r[1],
        state=JobState(r[2]),
        stage=r[3],
        percent=r[4],
        message=r[5],
        request=bytes(r[6]),
        response=None if r[7] is None else bytes(r[7]),
        error=None if r[8] is None else (int(r[8]), r[9] or ""),
        create_time=_from_us(r[10]),  # type: ignore[arg-type]
        update_time=_from_us(r[11]),  # type: ignore[arg-type]
        start_time=_from_us(r[12]),
        end_time=_from_us(r[13]),
        last_sequence=r[14],
        last_completed_stage=r[15],
        request_id=r[16],
        cancel_requested=bool(r[17]),
    )


def _event_from_row(r: tuple[Any, ...]) -> EventRecord:
    return EventRecord(
        operation=r[0],
        sequence=r[1],
        time=_from_us(r[2]),  # type: ignore[arg-type]
        event_type=r[3],
        payload=bytes(r[4]),
        terminal=bool(r[5]),
    )


def _artifact_from_row(r: tuple[Any, ...]) -> ArtifactRecord:
    return ArtifactRecord(
        operation=r[0],
        name=r[1],
        kind=r[2],
        media_type=r[3],
        path=r[4],
        size=r[5],
        sha256=r[6],
        expire_time=_from_us(r[7]),
    )


def _encode_token(create_us: int, name: str, scope: list) -> str:
    """A page token: where the page ended, and the filter (``scope``) of the listing it continues."""
    raw = json.dumps([create_us, name, scope], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, scope: list) -> tuple[int, str]:
    """Where the previous page ended; ValueError for a token this store did not issue, or one issued
    for another filter (AIP-158: the next page would silently mix two listings)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        create_us, name, issued_for = json.loads(raw)
        if not isinstance(create_us, int) or not isinstance(name, str):
            raise TypeError
    except (ValueError, TypeError) as exc:
        raise ValueError(f"page_token {token!r} is not one this server issued") from exc
    if issued_for != scope:
        raise ValueError("page_token was issued for another filter; list again from the first page with this filter")
    return create_us, name


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
