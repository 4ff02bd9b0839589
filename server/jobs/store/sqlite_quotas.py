"""The SQLite job store's per-tenant quota methods (JobStore's quota section), mixed into
SqliteJobStore. Every write runs in BEGIN IMMEDIATE on the store's one thread, so acquiring a
slot (count, then insert) is atomic against every other writer of the file."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from server.jobs.store.protocol import UNFINISHED_STATES, utcnow
from server.jobs.store.quota_args import check_lease_slot_args, checked_quota_values
from server.jobs.store.sqlite_schema import _to_us

__all__ = ["SqliteQuotaMethods"]

T = TypeVar("T")


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


class SqliteQuotaMethods:
    if TYPE_CHECKING:  # provided by SqliteJobStore

        async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...
        def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...
        def _require_conn(self) -> sqlite3.Connection: ...

    @staticmethod
    def _tenant_quotas_sync(conn: sqlite3.Connection, tenant: str) -> dict[str, float]:
        rows = conn.execute("SELECT quota, value FROM tenant_quotas WHERE tenant = ? ORDER BY quota", (tenant,))
        return {quota: float(value) for quota, value in rows}

    async def set_tenant_quotas(self, tenant: str, values: Mapping[str, float | None]) -> dict[str, float]:
        checked = checked_quota_values(tenant, values)

        def tx(conn: sqlite3.Connection) -> dict[str, float]:
            now_us = _to_us(utcnow())
            for quota, value in checked.items():
                if value is None:
                    conn.execute("DELETE FROM tenant_quotas WHERE tenant = ? AND quota = ?", (tenant, quota))
                else:
                    conn.execute(
                        "INSERT INTO tenant_quotas (tenant, quota, value, update_us) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (tenant, quota) DO UPDATE SET value = excluded.value, update_us = excluded.update_us",
                        (tenant, quota, value, now_us),
                    )
            return self._tenant_quotas_sync(conn, tenant)

        return await self._run(self._write, tx)

    async def tenant_quotas(self, tenant: str) -> dict[str, float]:
        return await self._run(lambda: self._tenant_quotas_sync(self._require_conn(), tenant))

    async def all_tenant_quotas(self) -> dict[str, dict[str, float]]:
        def q() -> dict[str, dict[str, float]]:
            out: dict[str, dict[str, float]] = {}
            for tenant, quota, value in self._require_conn().execute(
                "SELECT tenant, quota, value FROM tenant_quotas ORDER BY tenant, quota"
            ):
                out.setdefault(tenant, {})[quota] = float(value)
            return out

        return await self._run(q)

    async def acquire_quota_lease(
        self, resource: str, tenant: str, key: str, holder: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]:
        check_lease_slot_args(resource, tenant, key, ttl_s)

        def tx(conn: sqlite3.Connection) -> tuple[bool, int]:
            now_us = _to_us(utcnow())
            conn.execute(
                "DELETE FROM quota_leases WHERE resource = ? AND tenant = ? AND expire_us <= ?", (resource, tenant, now_us)
            )
            held = conn.execute(
                "SELECT count(*), sum(lease_key = ?) FROM quota_leases WHERE resource = ? AND tenant = ?",
                (key, resource, tenant),
            ).fetchone()
            count, mine = int(held[0]), bool(held[1])
            if not mine and limit > 0 and count >= limit:
                return False, count
            conn.execute(
                "INSERT INTO quota_leases (resource, tenant, lease_key, holder, expire_us) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (resource, tenant, lease_key) DO UPDATE SET holder = excluded.holder, expire_us = excluded.expire_us",
                (resource, tenant, key, holder, now_us + _us(ttl_s)),
            )
            return True, count if mine else count + 1

        return await self._run(self._write, tx)

    async def release_quota_lease(self, resource: str, tenant: str, key: str, holder: str) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM quota_leases WHERE resource = ? AND tenant = ? AND lease_key = ? AND holder = ?",
                (resource, tenant, key, holder),
            )

        await self._run(self._write, tx)

    async def renew_quota_leases(
        self, resource: str, holder: str, keys: Collection[tuple[str, str]], ttl_s: float
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        wanted = set(keys)

        def tx(conn: sqlite3.Connection) -> None:
            now_us = _to_us(utcnow())
            conn.execute("DELETE FROM quota_leases WHERE resource = ? AND expire_us <= ?", (resource, now_us))
            held = conn.execute(
                "SELECT tenant, lease_key FROM quota_leases WHERE resource = ? AND holder = ?", (resource, holder)
            ).fetchall()
            for tenant, key in held:
                if (tenant, key) in wanted:
                    conn.execute(
                        "UPDATE quota_leases SET expire_us = ? WHERE resource = ? AND tenant = ? AND lease_key = ?",
                        (now_us + _us(ttl_s), resource, tenant, key),
                    )
                else:
                    conn.execute(
                        "DELETE FROM quota_leases WHERE resource = ? AND tenant = ? AND lease_key = ?", (resource, tenant, key)
                    )

        await self._run(self._write, tx)

    async def count_quota_leases(self, resource: str, tenant: str) -> int:
        def q() -> int:
            row = self._require_conn().execute(
                "SELECT count(*) FROM quota_leases WHERE resource = ? AND tenant = ? AND expire_us > ?",
                (resource, tenant, _to_us(utcnow())),
            ).fetchone()
            return int(row[0])

        return await self._run(q)

    async def count_tenant_jobs(self, tenant: str) -> int:
        def q() -> int:
            row = self._require_conn().execute(
                "SELECT count(*) FROM operations WHERE tenant = ? AND state IN (?, ?)",
                (tenant, *(int(s) for s in UNFINISHED_STATES)),
            ).fetchone()
            return int(row[0])

        return await self._run(q)
