"""The API key methods of the PostgreSQL job store (JobStore.create_api_key and the rest), kept
out of postgres.py so that file stays about operations. PostgresJobStore inherits them. Times
are the database's clock, the one every replica and the admin CLI share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg

from server.jobs.store.protocol import ApiKeyExistsError, ApiKeyRecord
from server.jobs.store.sqlite_api_keys import api_key_from_row, check_api_key_args

__all__ = ["PostgresApiKeys"]

_COLUMNS = "key_id, tenant, scopes, secret_hash, create_time, expire_time, revoke_time, last_used_time"


def _utc(t: datetime | None) -> datetime | None:
    return None if t is None else t.astimezone(UTC)


class PostgresApiKeys:
    """Mixed into PostgresJobStore, which provides ``_fetchone`` and ``_fetchall``."""

    _fetchone: Callable[..., Any]
    _fetchall: Callable[..., Any]

    async def create_api_key(
        self,
        *,
        key_id: str,
        tenant: str,
        scopes: tuple[str, ...],
        secret_hash: str,
        expire_time: datetime | None = None,
    ) -> ApiKeyRecord:
        check_api_key_args(key_id, tenant, tuple(scopes), secret_hash)
        if expire_time is not None and expire_time.tzinfo is None:
            raise ValueError("naive datetime; job store times must be timezone-aware")
        try:
            row = await self._fetchone(
                f"INSERT INTO api_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, clock_timestamp(), %s, NULL, NULL) "
                f"RETURNING {_COLUMNS}",
                (key_id, tenant, " ".join(scopes), secret_hash, expire_time),
            )
        except psycopg.errors.UniqueViolation as exc:
            raise ApiKeyExistsError(f"an API key with id {key_id!r} exists already") from exc
        return api_key_from_row(row, _utc)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        row = await self._fetchone(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = %s", (key_id,), read=True)
        return None if row is None else api_key_from_row(row, _utc)

    async def list_api_keys(self, *, tenant: str | None = None) -> list[ApiKeyRecord]:
        sql = f"SELECT {_COLUMNS} FROM api_keys"
        params: Iterable[Any] = ()
        if tenant is not None:
            sql += " WHERE tenant = %s"
            params = (tenant,)
        rows = await self._fetchall(sql + " ORDER BY create_time, key_id", params, read=True)
        return [api_key_from_row(r, _utc) for r in rows]

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord | None:
        # coalesce: revoking twice keeps the first time, in one statement.
        row = await self._fetchone(
            f"UPDATE api_keys SET revoke_time = coalesce(revoke_time, clock_timestamp()) WHERE key_id = %s "
            f"RETURNING {_COLUMNS}",
            (key_id,),
        )
        return None if row is None else api_key_from_row(row, _utc)

    async def touch_api_key(self, key_id: str) -> None:
        await self._fetchone("UPDATE api_keys SET last_used_time = clock_timestamp() WHERE key_id = %s RETURNING key_id", (key_id,))

    async def has_api_keys(self) -> bool:
        return await self._fetchone("SELECT 1 FROM api_keys LIMIT 1", (), read=True) is not None
