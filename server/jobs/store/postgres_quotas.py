"""The PostgreSQL job store's per-tenant quota methods (JobStore's quota section), mixed into
PostgresJobStore.

Acquiring a slot is count-then-insert; two replicas doing it at once for the same tenant could
both see the last free slot, so it runs in a transaction holding a transaction-scoped advisory
lock on (resource, tenant): acquirers of one tenant queue for a few microseconds, other
tenants never wait. Times are the database's clock, the one clock replicas share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg import AsyncConnection

from server.jobs.store.protocol import UNFINISHED_STATES
from server.jobs.store.quota_args import check_lease_slot_args, checked_quota_values

__all__ = ["PostgresQuotaMethods"]

T = TypeVar("T")

_UNFINISHED = ", ".join(str(int(s)) for s in UNFINISHED_STATES)


def _lock_key(resource: str, tenant: str) -> int:
    digest = hashlib.sha256(f"framewise quota {resource}\0{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresQuotaMethods:
    if TYPE_CHECKING:  # provided by PostgresJobStore

        async def _call(self, fn: Callable[[AsyncConnection[Any]], Awaitable[T]], *, read: bool) -> T: ...
        async def _fetchone(self, sql: str, params: Iterable[Any], *, read: bool = False) -> tuple[Any, ...] | None: ...
        async def _fetchall(self, sql: str, params: Iterable[Any], *, read: bool = False) -> list[tuple[Any, ...]]: ...

    async def set_tenant_quotas(self, tenant: str, values: Mapping[str, float | None]) -> dict[str, float]:
        checked = checked_quota_values(tenant, values)

        async def tx(conn: AsyncConnection[Any]) -> dict[str, float]:
            async with conn.transaction():
                for quota, value in checked.items():
                    if value is None:
                        await conn.execute("DELETE FROM tenant_quotas WHERE tenant = %s AND quota = %s", (tenant, quota))
                    else:
                        await conn.execute(
                            "INSERT INTO tenant_quotas (tenant, quota, value, update_time) "
                            "VALUES (%s, %s, %s, clock_timestamp()) ON CONFLICT (tenant, quota) "
                            "DO UPDATE SET value = excluded.value, update_time = excluded.update_time",
                            (tenant, quota, value),
                        )
                rows = await (
                    await conn.execute("SELECT quota, value FROM tenant_quotas WHERE tenant = %s ORDER BY quota", (tenant,))
                ).fetchall()
            return {quota: float(value) for quota, value in rows}

        return await self._call(tx, read=False)

    async def tenant_quotas(self, tenant: str) -> dict[str, float]:
        rows = await self._fetchall(
            "SELECT quota, value FROM tenant_quotas WHERE tenant = %s ORDER BY quota", (tenant,), read=True
        )
        return {quota: float(value) for quota, value in rows}

    async def all_tenant_quotas(self) -> dict[str, dict[str, float]]:
        rows = await self._fetchall("SELECT tenant, quota, value FROM tenant_quotas ORDER BY tenant, quota", (), read=True)
        out: dict[str, dict[str, float]] = {}
        for tenant, quota, value in rows:
            out.setdefault(tenant, {})[quota] = float(value)
        return out

    async def acquire_quota_lease(
        self, resource: str, tenant: str, key: str, holder: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]:
        check_lease_slot_args(resource, tenant, key, ttl_s)

        async def tx(conn: AsyncConnection[Any]) -> tuple[bool, int]:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(resource, tenant),))
                await conn.execute(
                    "DELETE FROM quota_leases WHERE resource = %s AND tenant = %s AND expire_time <= clock_timestamp()",
                    (resource, tenant),
                )
                row = await (
                    await conn.execute(
                        "SELECT count(*), coalesce(bool_or(lease_key = %s), false) FROM quota_leases "
                        "WHERE resource = %s AND tenant = %s",
                        (key, resource, tenant),
                    )
                ).fetchone()
                count, mine = (int(row[0]), bool(row[1])) if row else (0, False)
                if not mine and limit > 0 and count >= limit:
                    return False, count
                await conn.execute(
                    "INSERT INTO quota_leases (resource, tenant, lease_key, holder, expire_time) "
                    "VALUES (%s, %s, %s, %s, clock_timestamp() + %s * interval '1 second') "
                    "ON CONFLICT (resource, tenant, lease_key) "
                    "DO UPDATE SET holder = excluded.holder, expire_time = excluded.expire_time",
                    (resource, tenant, key, holder, float(ttl_s)),
                )
            return True, count if mine else count + 1

        return await self._call(tx, read=False)

    async def release_quota_lease(self, resource: str, tenant: str, key: str, holder: str) -> None:
        await self._fetchone(
            "DELETE FROM quota_leases WHERE resource = %s AND tenant = %s AND lease_key = %s AND holder = %s RETURNING 1",
            (resource, tenant, key, holder),
        )

    async def renew_quota_leases(
        self, resource: str, holder: str, keys: Collection[tuple[str, str]], ttl_s: float
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        tenants = [t for t, _ in keys]
        lease_keys = [k for _, k in keys]

        async def tx(conn: AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute(
                    "DELETE FROM quota_leases WHERE resource = %s AND expire_time <= clock_timestamp()", (resource,)
                )
                # The holder's slots not in `keys` are gone from its memory: free them.
                await conn.execute(
                    "DELETE FROM quota_leases q WHERE q.resource = %s AND q.holder = %s AND NOT EXISTS "
                    "(SELECT 1 FROM unnest(%s::text[], %s::text[]) AS k(tenant, lease_key) "
                    " WHERE k.tenant = q.tenant AND k.lease_key = q.lease_key)",
                    (resource, holder, tenants, lease_keys),
                )
                await conn.execute(
                    "UPDATE quota_leases SET expire_time = clock_timestamp() + %s * interval '1 second' "
                    "WHERE resource = %s AND holder = %s",
                    (float(ttl_s), resource, holder),
                )

        await self._call(tx, read=False)

    async def count_quota_leases(self, resource: str, tenant: str) -> int:
        row = await self._fetchone(
            "SELECT count(*) FROM quota_leases WHERE resource = %s AND tenant = %s AND expire_time > clock_timestamp()",
            (resource, tenant),
            read=True,
        )
        return int(row[0]) if row else 0

    async def count_tenant_jobs(self, tenant: str) -> int:
        row = await self._fetchone(
            f"SELECT count(*) FROM operations WHERE tenant = %s AND state IN ({_UNFINISHED})", (tenant,), read=True
        )
        return int(row[0]) if row else 0
