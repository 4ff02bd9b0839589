"""Builds the quota enforcer from the server's parts (called by the composition root)."""

from __future__ import annotations

import time
from collections.abc import Callable

from server.cluster.membership import HEARTBEAT_INTERVAL_S
from server.jobs.files.storage import StorageManager
from server.jobs.files.uploads import UploadStore
from server.jobs.store import JobStore
from server.metrics import Metrics
from server.quotas.enforcer import QuotaEnforcer
from server.quotas.limits import QuotaConfig

__all__ = ["TenantStorage", "build_quota_enforcer"]


class TenantStorage:
    """A tenant's kept bytes as GetStorageStats reports them (its uploads, its operations'
    working and artifact folders), remembered ``cache_s`` per tenant: measuring walks the
    tenant's folders, and a burst of submits must not walk them once each. What an accepted
    upload declared is charged to the remembered figure at once, so a burst of uploads within
    ``cache_s`` cannot pass the quota together (until the next measurement counts the files)."""

    def __init__(self, store: JobStore, storage: StorageManager, uploads: UploadStore, *, cache_s: float) -> None:
        self._store, self._storage, self._uploads = store, storage, uploads
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, int]] = {}

    async def used(self, tenant: str) -> int:
        now = time.monotonic()
        hit = self._cache.get(tenant)
        if hit is not None and now - hit[0] < self._cache_s:
            return hit[1]
        names, _files, _bytes = await self._store.tenant_usage(tenant)
        folders = [name.removeprefix("operations/") for name in names]
        owned = {"uploads": await self._uploads.owned(tenant), "processed": folders, "videos": folders}
        total = (await self._storage.stats(owned)).total_bytes
        self._cache[tenant] = (now, total)
        for stale in [t for t, (at, _) in self._cache.items() if now - at >= self._cache_s]:
            del self._cache[stale]
        return total

    def charge(self, tenant: str, size: int) -> None:
        hit = self._cache.get(tenant)
        if hit is not None:
            self._cache[tenant] = (hit[0], hit[1] + size)


def build_quota_enforcer(
    config: QuotaConfig,
    store: JobStore,
    *,
    replica_id: str,
    session_alive: Callable[[str, str], bool] | None,
    storage: TenantStorage | None,
    metrics: Metrics | None = None,
) -> QuotaEnforcer:
    """With a store replicas share (PostgreSQL), the rate share is 1 / the replicas whose
    heartbeat is at most 3 intervals old (membership's own notion of live)."""
    live_replicas = None
    if store.shared_by_replicas:

        async def live_replicas() -> int:
            return len(await store.list_replicas(seen_within_s=3 * HEARTBEAT_INTERVAL_S))

    return QuotaEnforcer(
        store,
        config,
        holder=replica_id,
        live_replicas=live_replicas,
        session_alive=session_alive,
        storage_used=None if storage is None else storage.used,
        storage_charged=None if storage is None else storage.charge,
        refused=None if metrics is None else (lambda quota: metrics.quota_refusals.labels(quota).inc()),
    )
