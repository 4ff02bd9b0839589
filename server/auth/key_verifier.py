"""Checks a presented API key against the job store every replica shares.

Each call looks its key up by key id and compares the SHA-256 of what was presented with the
stored hash (server/auth/keys.py). A record read from the store is reused for at most
``cache_ttl_s`` (default 2 s): a revocation made on any replica or by the admin CLI holds
everywhere within that time, and a burst of calls with one key costs one store read per key
per ``cache_ttl_s`` instead of one per call (measured on a shared 2-core host: a SQLite read
through the store's thread 0.12-0.18 ms p50, a PostgreSQL round trip 0.15-0.5 ms, against a
0.5 ms budget for everything authentication adds; a cached check is ~3 µs).
``cache_ttl_s=0`` reads the store on every call. Expiry is checked on every call against the
clock, whatever the cache holds. A revocation made through this process (``invalidate``) is
seen at once.

Store outage: a key that must be read while the store is unreachable fails the call with the
store's JobStoreUnavailableError (UNAVAILABLE, "retry shortly"), never with UNAUTHENTICATED (the
key may well be valid) and never by admitting it (it may have been revoked); keys still cached
keep working until their entry is ``cache_ttl_s`` old.

Last use: the store's ``last_used_time`` is refreshed in the background at most once per
``touch_interval_s`` per key, never on the call's path.

The cached path does as little as it can (a dict lookup, one SHA-256, a clock read): it runs on
every authenticated call.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from server.auth.keys import KEY_LENGTH, KEY_PREFIX, parse_key
from server.auth.principal import SCOPES, Principal
from server.jobs.store.protocol import ApiKeyRecord, JobStore

__all__ = ["ApiKeyVerifier", "KeyCheck"]

log = logging.getLogger(__name__)

_ID_END = len(KEY_PREFIX) + 12  # where the key id ends and the "_" before the secret stands


class KeyCheck(NamedTuple):
    """The verdict on one presented key: a principal, or the reason it failed (for the audit
    line only)."""

    principal: Principal | None
    key_id: str
    reason: str  # "ok", "malformed", "unknown_key", "wrong_secret", "revoked", "expired"
    tenant: str = ""


@dataclass(slots=True)
class _Entry:
    """What one store read said about a key id, prepared for the calls that reuse it."""

    record: ApiKeyRecord | None
    read_at: float  # the verifier's clock
    principal: Principal | None
    expires_at: float | None  # POSIX time; None: never


def _entry(record: ApiKeyRecord | None, read_at: float) -> _Entry:
    if record is None:
        return _Entry(None, read_at, None, None)
    principal = Principal(
        tenant=record.tenant,
        subject=record.key_id,
        scopes=frozenset(s for s in record.scopes if s in SCOPES),
        via="api_key",
    )
    expires_at = None if record.expire_time is None else record.expire_time.timestamp()
    return _Entry(record, read_at, principal, expires_at)


class ApiKeyVerifier:
    def __init__(
        self,
        store: JobStore,
        *,
        cache_ttl_s: float = 2.0,
        touch_interval_s: float = 60.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_ttl_s < 0:
            raise ValueError(f"cache_ttl_s must be >= 0, got {cache_ttl_s}")
        self._store = store
        self._ttl = cache_ttl_s
        self._touch_interval = touch_interval_s
        self._max_cached = max_cached
        self._clock = clock
        self._wall_clock = wall_clock
        # key id -> what the store said ("no such key" included), least recently read first
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        # One store read per key id at a time: concurrent calls with the same key wait for it.
        self._reads: dict[str, asyncio.Future[_Entry]] = {}
        self._touched: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def verify(self, token: str) -> KeyCheck:
        # The shape first, without a regex: the full check (parse_key) runs only before a store
        # read, so a malformed token never costs one.
        if len(token) != KEY_LENGTH or not token.startswith(KEY_PREFIX) or token[_ID_END] != "_":
            return KeyCheck(None, "", "malformed")
        key_id = token[len(KEY_PREFIX):_ID_END]
        now = self._clock()
        entry = self._cache.get(key_id)
        if entry is None or now - entry.read_at >= self._ttl:
            if parse_key(token) is None:
                return KeyCheck(None, "", "malformed")
            entry = await self._read(key_id, now)
        record = entry.record
        if record is None:
            return KeyCheck(None, key_id, "unknown_key")
        # Constant-time in the hash: timing tells a guesser nothing about how close it came.
        if not hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), record.secret_hash):
            return KeyCheck(None, key_id, "wrong_secret", record.tenant)
        if record.revoke_time is not None:
            return KeyCheck(None, key_id, "revoked", record.tenant)
        if entry.expires_at is not None and self._wall_clock() >= entry.expires_at:
            return KeyCheck(None, key_id, "expired", record.tenant)
        last = self._touched.get(key_id)
        if last is None or now - last >= self._touch_interval:
            self._touch_later(key_id, now)
        return KeyCheck(entry.principal, key_id, "ok", record.tenant)

    def invalidate(self, key_id: str) -> None:
        """Forget what was read about ``key_id`` (this process revoked it)."""
        self._cache.pop(key_id, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self, key_id: str, now: float) -> _Entry:
        pending = self._reads.get(key_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[_Entry] = asyncio.get_running_loop().create_future()
        self._reads[key_id] = future
        try:
            entry = _entry(await self._store.get_api_key(key_id), now)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        else:
            future.set_result(entry)
        finally:
            del self._reads[key_id]
        if self._ttl > 0:
            self._cache[key_id] = entry
            self._cache.move_to_end(key_id)
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return entry

    def _touch_later(self, key_id: str, now: float) -> None:
        self._touched[key_id] = now
        if len(self._touched) > self._max_cached:
            self._touched.pop(next(iter(self._touched)))
        task = asyncio.get_running_loop().create_task(self._touch(key_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _touch(self, key_id: str) -> None:
        try:
            await self._store.touch_api_key(key_id)
        except Exception as exc:  # noqa: BLE001 - last use is informational; the call went on
            log.debug("could not record an API key's last use", extra={"key_id": key_id, "error": str(exc)})
