"""What both store backends share below SQL: records from result rows, and page tokens.

Both backends select the same columns in the same order (``_OP_COLUMNS`` and friends in each
schema module); they differ only in how a time is stored (SQLite: integer microseconds since the
epoch; PostgreSQL: timestamptz), so each passes its own ``when`` to turn a stored time into an
aware UTC datetime.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from server.errors import shown
from server.jobs.store.protocol import ArtifactRecord, EventRecord, JobState, OperationRecord, ReplicaRecord

When = Callable[[Any], datetime | None]


def op_from_row(r: Any, when: When) -> OperationRecord:
    return OperationRecord(
        name=r[0],
        kind=r[1],
        state=JobState(r[2]),
        stage=r[3],
        percent=float(r[4]),
        message=r[5],
        response=None if r[6] is None else bytes(r[6]),
        error=None if r[7] is None else (int(r[7]), r[8] or ""),
        create_time=when(r[9]),  # type: ignore[arg-type]
        update_time=when(r[10]),  # type: ignore[arg-type]
        start_time=when(r[11]),
        end_time=when(r[12]),
        last_sequence=r[13],
        last_completed_stage=r[14],
        request_id=r[15],
        cancel_requested=bool(r[16]),
        lease_owner=r[17],
        lease_epoch=r[18],
        lease_expire_time=when(r[19]),
        tenant=r[20],
    )


def event_from_row(r: Any, when: When) -> EventRecord:
    return EventRecord(
        operation=r[0],
        sequence=r[1],
        time=when(r[2]),  # type: ignore[arg-type]
        event_type=r[3],
        payload=bytes(r[4]),
        terminal=bool(r[5]),
    )


def artifact_from_row(r: Any, when: When) -> ArtifactRecord:
    return ArtifactRecord(
        operation=r[0],
        name=r[1],
        kind=r[2],
        media_type=r[3],
        path=r[4],
        size=r[5],
        sha256=r[6],
        expire_time=when(r[7]),
    )


def replica_from_row(r: Any, when: When) -> ReplicaRecord:
    return ReplicaRecord(
        replica_id=r[0],
        address=r[1],
        register_time=when(r[2]),  # type: ignore[arg-type]
        heartbeat_time=when(r[3]),  # type: ignore[arg-type]
    )


def encode_token(create_us: int, name: str, scope: list) -> str:
    """A page token: where the page ended, and the filter (``scope``) of the listing it continues."""
    raw = json.dumps([create_us, name, scope], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: list) -> tuple[int, str]:
    """Where the previous page ended; ValueError for a token this store did not issue, or one issued
    for another filter (AIP-158: the next page would silently mix two listings)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        create_us, name, issued_for = json.loads(raw)
        if not isinstance(create_us, int) or not isinstance(name, str):
            raise TypeError
    except (ValueError, TypeError) as exc:
        raise ValueError(f"page_token {shown(token)} is not one this server issued") from exc
    if issued_for != scope:
        raise ValueError("page_token was issued for another filter; list again from the first page with this filter")
    return create_us, name
