"""The API key methods of the SQLite job store (JobStore.create_api_key and the rest), kept out
of sqlite.py so that file stays about operations. SqliteJobStore inherits them; they run on the
store's one database thread like every other method."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from server.jobs.store.protocol import ApiKeyExistsError, ApiKeyRecord, utcnow
from server.jobs.store.sqlite_schema import _from_us, _to_us

__all__ = ["SqliteApiKeys", "check_api_key_args"]

T = TypeVar("T")

_COLUMNS = "key_id, tenant, scopes, secret_hash, create_us, expire_us, revoke_us, last_used_us"


def check_api_key_args(key_id: str, tenant: str, scopes: tuple[str, ...], secret_hash: str) -> None:
    """ValueError for a key no backend stores (shared by both backends)."""
    if not key_id or not tenant or not secret_hash:
        raise ValueError("an API key needs a key id, a tenant and a secret hash")
    for scope in scopes:
        # Stored space-separated, the way OAuth writes a scope list.
        if not scope or any(c.isspace() for c in scope):
            raise ValueError(f"scope {scope!r} is empty or contains white space")


def api_key_from_row(r: tuple[Any, ...], to_time: Callable[[Any], Any]) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=r[0],
        tenant=r[1],
        scopes=tuple(r[2].split()),
        secret_hash=r[3],
        create_time=to_time(r[4]),
        expire_time=to_time(r[5]),
        revoke_time=to_time(r[6]),
        last_used_time=to_time(r[7]),
    )


class SqliteApiKeys:
    """Mixed into SqliteJobStore, which provides ``_run``, ``_write`` and ``_require_conn``."""

    _run: Callable[..., Any]
    _write: Callable[..., Any]
    _require_conn: Callable[[], sqlite3.Connection]

    async def create_api_key(
        self,
        *,
        key_id: str,
        tenant: str,
        scopes: tuple[str, ...],
        secret_hash: str,
        expire_time: Any = None,
    ) -> ApiKeyRecord:
        check_api_key_args(key_id, tenant, tuple(scopes), secret_hash)
        expire_us = None if expire_time is None else _to_us(expire_time)

        def tx(conn: sqlite3.Connection) -> ApiKeyRecord:
            try:
                conn.execute(
                    f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                    (key_id, tenant, " ".join(scopes), secret_hash, _to_us(utcnow()), expire_us),
                )
            except sqlite3.IntegrityError as exc:
                raise ApiKeyExistsError(f"an API key with id {key_id!r} exists already") from exc
            return _get(conn, key_id)  # type: ignore[return-value]

        return await self._run(self._write, tx)

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        return await self._run(lambda: _get(self._require_conn(), key_id))

    async def list_api_keys(self, *, tenant: str | None = None) -> list[ApiKeyRecord]:
        def q() -> list[ApiKeyRecord]:
            conn = self._require_conn()
            if tenant is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY create_us, key_id").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM api_keys WHERE tenant = ? ORDER BY create_us, key_id", (tenant,)
                ).fetchall()
            return [api_key_from_row(r, _from_us) for r in rows]

        return await self._run(q)

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord | None:
        def tx(conn: sqlite3.Connection) -> ApiKeyRecord | None:
            conn.execute(
                "UPDATE api_keys SET revoke_us = ? WHERE key_id = ? AND revoke_us IS NULL", (_to_us(utcnow()), key_id)
            )
            return _get(conn, key_id)

        return await self._run(self._write, tx)

    async def touch_api_key(self, key_id: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE api_keys SET last_used_us = ? WHERE key_id = ?", (_to_us(utcnow()), key_id))

        await self._run(self._write, tx)

    async def has_api_keys(self) -> bool:
        return await self._run(lambda: self._require_conn().execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None)


def _get(conn: sqlite3.Connection, key_id: str) -> ApiKeyRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
    return None if row is None else api_key_from_row(row, _from_us)
