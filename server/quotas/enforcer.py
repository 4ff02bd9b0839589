"""Per-tenant quotas, enforced: what the quota interceptor and the servicers call.

Where each quota is counted
    * rates (``rate.*``/``burst.*``): token buckets in this replica's memory, refilled at the
      tenant's rate divided by the live replicas (server/quotas/rates.py: no store round trip
      on a call's path);
    * ``sessions``: one slot per tracking session in the store's ``quota_leases`` table, taken
      atomically at open (or resume) against every replica's slots, freed when the session is
      released, renewed by the replica holding it and lapsing when that replica stops;
    * ``jobs``: the tenant's QUEUED and RUNNING operations in the store, counted at submit;
    * ``storage_bytes``: what the tenant keeps (its artifacts, plus its uploads where the
      upload store can say), measured at upload and submit.

Overrides (``framewise admin quotas set``) are re-read from the store every ``refresh_s`` by a
background task, never on a call's path; a change reaches every replica within that time.

Fairness: the defaults sit under the server's global bounds (tracking sessions per replica,
jobs waiting in the cluster), and the per-tenant checks run first, so one tenant at its quota
is refused while the global room it left stays open to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Protocol

from server.aio import cancel_and_wait
from server.errors import QuotaExceeded, QuotaViolation, shown
from server.quotas.limits import QuotaConfig, TenantLimits
from server.quotas.rates import RateLimiter

__all__ = ["SESSIONS", "QuotaEnforcer", "QuotaStore"]

log = logging.getLogger(__name__)

# The quota_leases resource of tracking sessions.
SESSIONS = "sessions"
# How long a refused caller is told to wait where nothing says when room comes back: a session
# or a job ends when its client or its work ends.
_COUNT_RETRY_S = 5.0
_STORAGE_RETRY_S = 60.0


class QuotaStore(Protocol):
    """The JobStore methods quotas use."""

    shared_by_replicas: bool

    async def all_tenant_quotas(self) -> dict[str, dict[str, float]]: ...

    async def acquire_quota_lease(
        self, resource: str, tenant: str, key: str, holder: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]: ...

    async def release_quota_lease(self, resource: str, tenant: str, key: str, holder: str) -> None: ...

    async def renew_quota_leases(
        self, resource: str, holder: str, keys: Collection[tuple[str, str]], ttl_s: float
    ) -> None: ...

    async def count_tenant_jobs(self, tenant: str) -> int: ...


class QuotaEnforcer:
    def __init__(
        self,
        store: QuotaStore,
        config: QuotaConfig,
        *,
        holder: str,
        live_replicas: Callable[[], Awaitable[int]] | None = None,
        session_alive: Callable[[str, str], bool] | None = None,
        storage_used: Callable[[str], Awaitable[int]] | None = None,
        storage_charged: Callable[[str, int], None] | None = None,
        rates: RateLimiter | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        """``holder``: this replica's id (its session slots). ``live_replicas``: how many
        replicas share the tenant rates (None: this one alone). ``session_alive(tenant,
        session_id)``: whether this replica still holds that session (its registry), asked by
        the periodic renewal, which frees the slots of sessions gone meanwhile (expired after
        their idle TTL, lost). ``storage_used``: a tenant's kept bytes (None: storage is not limited);
        ``storage_charged(tenant, bytes)``: told the bytes of each upload admitted.
        ``refused(quota)``: called at each refusal (the Prometheus counter)."""
        self.store = store
        self.config = config
        self.holder = holder
        self.rates = rates if rates is not None else RateLimiter()  # (an empty limiter is falsy)
        self._live_replicas = live_replicas
        self._session_alive = session_alive
        # The session slots this replica took: (tenant, session id).
        self._held: set[tuple[str, str]] = set()
        self._releases: set[asyncio.Task[None]] = set()
        # Whether the store already knows this replica holds no slot: then a renewal would only
        # cost a commit (an fsync on SQLite) and is skipped.
        self._synced_empty = False
        self._storage_used = storage_used
        self._storage_charged = storage_charged
        self._refused = refused or (lambda quota: None)
        self._overrides: Mapping[str, Mapping[str, float]] = {}
        self._limits: dict[str, TenantLimits] = {}
        self._default_limits = config.limits()
        # One submit at a time per tenant on this replica: count-then-create cannot let a
        # tenant's concurrent submits pass its jobs quota together. (One lock per tenant that
        # submitted: tenants are authenticated principals, not names a caller invents.)
        self._job_locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []

    # -- limits --------------------------------------------------------------------------------

    def limits(self, tenant: str) -> TenantLimits:
        limits = self._limits.get(tenant)
        if limits is None:
            overrides = self._overrides.get(tenant)
            limits = self.config.limits(overrides) if overrides else self._default_limits
            if overrides:
                self._limits[tenant] = limits
        return limits

    def use_overrides(self, overrides: Mapping[str, Mapping[str, float]]) -> None:
        """Replaces the cached overrides (what refresh() read from the store)."""
        self._overrides = overrides
        self._limits = {}

    # -- rates ---------------------------------------------------------------------------------

    def check_rate(self, tenant: str, family: str) -> None:
        """One call of ``tenant`` in ``family``: QuotaExceeded when its bucket is empty. No
        I/O: a dict lookup and a bucket update."""
        rate, burst = self.limits(tenant).rates[family]
        wait_s = self.rates.take(tenant, family, rate, burst)
        if wait_s > 0:
            quota = f"rate.{family}"
            self._refused(quota)
            raise QuotaExceeded(
                f"quota {quota} exceeded: tenant {shown(tenant)} may make {rate:g} {family} calls per second "
                f"(bursts of {burst:g}); retry in {wait_s:.2f} s",
                [QuotaViolation(quota, f"{rate:g} {family} calls per second, bursts of {burst:g}")],
                retry_after_s=wait_s,
            )

    # -- tracking sessions ---------------------------------------------------------------------

    def _session_ttl_s(self) -> float:
        return 3 * self.config.session_lease_renew_s

    async def acquire_session(self, tenant: str, session_id: str) -> None:
        """Takes a session slot for ``tenant`` (idempotent for a session it holds already, e.g.
        resumed here from another replica): QuotaExceeded at its quota."""
        limit = self.limits(tenant).sessions
        granted, held = await self.store.acquire_quota_lease(
            SESSIONS, tenant, session_id, self.holder, limit, self._session_ttl_s()
        )
        if not granted:
            self._refused(SESSIONS)
            raise QuotaExceeded(
                f"quota sessions exceeded: tenant {shown(tenant)} holds {held} of its {limit} tracking sessions "
                "(over every replica); close one (end its stream), let idle ones expire, or retry later",
                [QuotaViolation(SESSIONS, f"{limit} tracking sessions at once")],
                retry_after_s=_COUNT_RETRY_S,
            )
        self._held.add((tenant, session_id))
        self._synced_empty = False

    async def release_session(self, tenant: str, session_id: str) -> None:
        """Frees the slot. A failure is logged, not raised: the slot lapses by itself once this
        replica stops renewing it."""
        self._held.discard((tenant, session_id))
        try:
            await self.store.release_quota_lease(SESSIONS, tenant, session_id, self.holder)
        except Exception:  # noqa: BLE001 - the store is down; renewal frees it when it is back
            log.warning("could not free a tracking session's quota slot; it is freed at the next renewal", exc_info=True)

    def release_session_soon(self, tenant: str, session_id: str) -> None:
        """release_session in the background: a stream's cleanup (which may run while its
        task is cancelled) never waits on the store."""
        self._held.discard((tenant, session_id))
        task = asyncio.get_running_loop().create_task(self.release_session(tenant, session_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    # -- jobs and storage ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def job_admission(self, tenant: str) -> AsyncIterator[None]:
        """Around one submit: QuotaExceeded when the tenant has its quota of jobs queued or
        running, or its storage quota used up; else the submit runs holding the tenant's lock,
        so this replica's concurrent submits of one tenant are counted one after the other."""
        lock = self._job_locks.setdefault(tenant, asyncio.Lock())
        async with lock:
            await self.check_storage(tenant)
            limit = self.limits(tenant).jobs
            if limit > 0:
                held = await self.store.count_tenant_jobs(tenant)
                if held >= limit:
                    self._refused("jobs")
                    raise QuotaExceeded(
                        f"quota jobs exceeded: tenant {shown(tenant)} has {held} jobs queued or running, its quota is "
                        f"{limit}; wait for one to finish (WatchOperation) or cancel one, then retry",
                        [QuotaViolation("jobs", f"{limit} jobs queued or running at once")],
                        retry_after_s=_COUNT_RETRY_S,
                    )
            yield

    async def check_storage(self, tenant: str, incoming_bytes: int = 0) -> None:
        """QuotaExceeded when ``tenant`` keeps its storage quota already, or would pass it with
        ``incoming_bytes`` more (an upload's declared size)."""
        limit = self.limits(tenant).storage_bytes
        if limit <= 0 or self._storage_used is None:
            return
        used = await self._storage_used(tenant)
        if used + max(0, incoming_bytes) > limit:
            more = f" and this upload adds {incoming_bytes} bytes" if incoming_bytes else ""
            self._refused("storage_bytes")
            raise QuotaExceeded(
                f"quota storage_bytes exceeded: tenant {shown(tenant)} keeps {used} bytes{more}, its quota is {limit} "
                "bytes; delete finished operations (DeleteOperation) or wait for retention to remove them, then retry",
                [QuotaViolation("storage_bytes", f"{limit} bytes of uploads and artifacts")],
                retry_after_s=_STORAGE_RETRY_S,
            )
        if incoming_bytes > 0 and self._storage_charged is not None:
            self._storage_charged(tenant, incoming_bytes)

    # -- background ----------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-reads the overrides and the live replica count; drops full buckets."""
        self.use_overrides(await self.store.all_tenant_quotas())
        if self._live_replicas is not None:
            self.rates.set_replicas(await self._live_replicas())
        self.rates.sweep()

    async def renew_sessions(self) -> None:
        """Renews this replica's session slots and frees those of sessions it no longer holds."""
        if self._session_alive is not None:
            self._held = {(t, k) for t, k in self._held if self._session_alive(t, k)}
        if not self._held and self._synced_empty:
            return
        held = list(self._held)
        await self.store.renew_quota_leases(SESSIONS, self.holder, held, self._session_ttl_s())
        self._synced_empty = not held

    async def start(self) -> None:
        """Reads the overrides once now (a failure is logged: the defaults hold until a refresh
        works), then refreshes and renews in the background."""
        try:
            await self.refresh()
            # Frees the slots a previous process under this replica id left behind.
            await self.renew_sessions()
        except Exception:  # noqa: BLE001 - the store may be down at start; refresh retries
            log.warning("could not read the per-tenant quotas; defaults apply until the next refresh", exc_info=True)
        self._tasks = [
            asyncio.create_task(self._every(self.config.refresh_s, self.refresh, "quota refresh"), name="quota-refresh"),
            asyncio.create_task(
                self._every(self.config.session_lease_renew_s, self.renew_sessions, "session slot renewal"),
                name="quota-session-renewal",
            ),
        ]

    async def _every(self, interval_s: float, work: Callable[[], Awaitable[None]], what: str) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:  # noqa: BLE001 - retried at the next interval
                log.warning(f"{what} failed; retrying in {interval_s:g} s", exc_info=True)

    async def stop(self) -> None:
        """Stops the background work and frees every session slot this replica holds (call it
        once no stream runs: at shutdown its sessions are handed off or released)."""
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        if self._releases:
            await asyncio.wait(list(self._releases), timeout=5.0)
        self._held.clear()
        try:
            async with asyncio.timeout(5.0):
                await self.store.renew_quota_leases(SESSIONS, self.holder, [], self._session_ttl_s())
        except Exception:  # noqa: BLE001 - the slots lapse by themselves
            log.warning("could not free this replica's session slots at shutdown; they lapse by themselves", exc_info=True)
