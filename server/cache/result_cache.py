"""The result cache: detection and matting results by content hash, model and parameters.

Why a SQLite file
    Jobs run in the job worker process and RPCs in the serving process, so a dict in either
    is not shared. Both open the same file (``<storage-root>/cache/results.sqlite3``), so a
    talking video submitted again finds what its first run, or a RemoveBackground RPC,
    computed. With several replicas each has its own file: the cache is per replica. Replicas
    sharing a job store (PostgreSQL) also share the storage root, so there the file is named
    after the replica (``results-<replica-id>.sqlite3``): one shared file, emptied by every
    replica as it starts, failed the others' open with "disk I/O error".

What a key is
    server/cache/keys.py: sha256 over the input content (encoded bytes, or raw pixels with
    format and size), the Triton model name, a fingerprint of the model's spec (version and
    every config parameter, the weights' sha256 among them) and every parameter that changes
    the result. A model reload that changes version or weights changes every key, so the old
    entries are never read again; the process that sees the new spec also deletes them.

Bound and eviction
    Entries count their value's bytes plus ENTRY_OVERHEAD_BYTES. An insert evicts the least
    recently used entries in the same transaction until the total is within ``max_bytes``,
    so the bound holds whichever process writes. A hit updates ``last_used``. The file on
    disk is somewhat larger than the total (SQLite pages, the WAL).

Durability
    None needed: the serving process deletes the file when it starts (a new build may compute
    results differently), so the connection runs with ``synchronous=OFF``. A failing cache
    (locked past its busy timeout, disk full) never fails a request: the lookup counts as a
    miss, the store is skipped, and the failure is counted and logged.

Threading
    As the job store (server/jobs/store/sqlite.py), through server/sqlite_thread.py: one
    dedicated thread per process owns the connection, so database work never runs on the
    event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from framewise.v1 import common_pb2
from server.cache.keys import CacheKey, entry_key, image_digest, image_size, model_id
from server.config import ServerConfig
from server.metrics import Metrics
from server.sqlite_thread import SqliteThread
from server.triton.model_spec import ModelSpec
from server.vision.image_decode import DecodedImage

log = logging.getLogger(__name__)

T = TypeVar("T")

# Charged per entry beside its value (key, columns, index entries), so a cache full of small
# detection results is bounded too.
ENTRY_OVERHEAD_BYTES = 128
# Inputs at least this big are hashed in a thread (hashlib releases the GIL): sha256 runs at
# about 1 GB/s, so smaller ones cost the event loop well under a millisecond.
_HASH_IN_THREAD_BYTES = 256 * 1024

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        id INTEGER PRIMARY KEY,
        key BLOB NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        model TEXT NOT NULL,
        model_id TEXT NOT NULL,
        size INTEGER NOT NULL,
        last_used INTEGER NOT NULL
    )""",
    # Values in a table of their own: a hit's touch of last_used rewrites a small row, not the
    # value (SQLite rewrites a whole record on UPDATE: 200 kB per hit, measured 3x slower).
    "CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used, id)",
    "CREATE INDEX IF NOT EXISTS entries_model ON entries (model, model_id)",
    # The running total, kept by triggers so every write path (insert, replace, evict, purge)
    # updates it in its own transaction.
    "CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO totals (id, bytes) VALUES (0, 0)",
    """CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries
        BEGIN UPDATE totals SET bytes = bytes + NEW.size; END""",
    """CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries
        BEGIN UPDATE totals SET bytes = bytes - OLD.size; DELETE FROM blobs WHERE id = OLD.id; END""",
    """CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF size ON entries
        BEGIN UPDATE totals SET bytes = bytes - OLD.size + NEW.size; END""",
)


def result_cache_path(config: ServerConfig) -> Path:
    """The replica's cache file: under its storage root, beside the job storage tiers; named
    after the replica when the storage root is shared by several (a PostgreSQL job store)."""
    if config.jobs.store_path is not None:  # SQLite: one replica owns the storage root
        return config.jobs.storage_root / "cache" / "results.sqlite3"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", config.replica_id)[:100]
    return config.jobs.storage_root / "cache" / f"results-{safe}.sqlite3"


def result_cache_for(config: ServerConfig, metrics: Metrics) -> ResultCache | None:
    """The replica's cache (to ``open``), or None when ``--result-cache-bytes`` is 0. Both
    processes of a replica build theirs with this, from the same settings."""
    if config.result_cache_bytes <= 0:
        return None
    return ResultCache(result_cache_path(config), max_bytes=config.result_cache_bytes, metrics=metrics)


class ResultCache:
    def __init__(self, path: Path, *, max_bytes: int, metrics: Metrics, busy_timeout_ms: int = 1000) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.metrics = metrics
        # A lock held longer than this (another process writing) makes the operation fail,
        # which the caller sees as a miss: the cache never holds a request up for long.
        self._busy_timeout_ms = busy_timeout_ms
        self._db = SqliteThread(
            "result-cache", closed_error=lambda: sqlite3.ProgrammingError("the result cache is closed")
        )
        # Model name -> (the spec last seen, its model_id): the id is computed once per spec.
        self._models: dict[str, tuple[ModelSpec, str]] = {}
        # Model name -> the id whose entries stay; the others are deleted before the next access.
        self._purges: dict[str, str] = {}
        self._failing = False
        self.bytes_in_use = 0  # as of this process's last write

    # -- plumbing -------------------------------------------------------------------------------

    async def open(self, *, clear: bool = False) -> ResultCache:
        """``clear``: start from an empty file. The serving process clears it once when it
        starts, before its job worker opens the same file (without clearing)."""
        await self._db.run(self._open_sync, clear)
        self.metrics.result_cache_bytes.set(self.bytes_in_use)
        return self

    def _open_sync(self, clear: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if clear:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        conn = self._db.connect(self.path, busy_timeout_ms=self._busy_timeout_ms, synchronous="OFF")
        self._write(lambda c: [c.execute(statement) for statement in _SCHEMA])
        self.bytes_in_use = self._total(conn)

    async def close(self) -> None:
        await self._db.close()

    def _require_conn(self) -> sqlite3.Connection:
        return self._db.conn()

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` inside BEGIN IMMEDIATE ... COMMIT, on the cache's thread."""
        return self._db.write(fn)

    @staticmethod
    def _total(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT bytes FROM totals").fetchone()[0])

    async def _run(self, kind: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn`` on the cache thread after any pending purge; None when the cache failed."""
        purges, self._purges = self._purges, {}
        try:
            result = await self._db.run(self._after_purges, purges, fn, *args)
        except (sqlite3.Error, OSError, RuntimeError) as exc:  # RuntimeError: the executor is shut down
            self.metrics.result_cache_errors.labels(kind).inc()
            if not self._failing:  # once per failing stretch, not once per request
                log.warning(
                    "result cache failed; requests go on without it", extra={"path": str(self.path), "error": str(exc)}
                )
            self._failing = True
            return None
        if self._failing:
            log.info("result cache works again", extra={"path": str(self.path)})
        self._failing = False
        return result

    def _after_purges(self, purges: dict[str, str], fn: Callable[..., T], *args: Any) -> T:
        for model, keep in purges.items():
            removed = self._write(
                lambda c, m=model, k=keep: c.execute("DELETE FROM entries WHERE model = ? AND model_id != ?", (m, k)).rowcount
            )
            if removed:
                log.info("dropped cached results of a replaced model", extra={"model": model, "entries": removed})
        return fn(*args)

    # -- keys -----------------------------------------------------------------------------------

    async def key(
        self, kind: str, spec: ModelSpec, image: common_pb2.Image | DecodedImage, params: Mapping[str, object]
    ) -> CacheKey:
        """The key of ``kind``'s result of ``image`` by the model ``spec`` with ``params``."""
        if image_size(image) < _HASH_IN_THREAD_BYTES:
            content = image_digest(image)
        else:
            content = await asyncio.to_thread(image_digest, image)
        return entry_key(kind, spec, self._model_id(spec), content, params)

    def _model_id(self, spec: ModelSpec) -> str:
        known = self._models.get(spec.name)
        if known is not None and known[0] is spec:  # the monitor hands out a new object on a change
            return known[1]
        spec_id = model_id(spec)
        if known is not None and known[1] != spec_id:
            # A reload changed the model: its old entries can never be hit again; free their space.
            self._purges[spec.name] = spec_id
        self._models[spec.name] = (spec, spec_id)
        return spec_id

    # -- entries --------------------------------------------------------------------------------

    async def get(self, key: CacheKey) -> bytes | None:
        """The stored value (and it becomes the most recently used), or None."""
        value = await self._run(key.kind, self._get_sync, key.digest, time.time_ns())
        counter = self.metrics.result_cache_hits if value is not None else self.metrics.result_cache_misses
        counter.labels(key.kind).inc()
        return value

    def _get_sync(self, digest: bytes, now_ns: int) -> bytes | None:
        conn = self._require_conn()
        row = conn.execute(
            "SELECT entries.id, blobs.value FROM entries JOIN blobs ON blobs.id = entries.id WHERE entries.key = ?",
            (digest,),
        ).fetchone()
        if row is None:
            return None
        # Its own statement: if another process evicted the entry in between, this touches
        # nothing, and the value read is still the complete one (a read sees one snapshot).
        conn.execute("UPDATE entries SET last_used = ? WHERE id = ?", (now_ns, row[0]))
        return bytes(row[1])

    async def put(self, key: CacheKey, value: bytes) -> None:
        """Store ``value`` (replacing an entry of the same key) and evict the least recently
        used entries beyond the bound, in one transaction. A value bigger than the whole bound
        is not stored."""
        size = len(value) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        now_ns = time.time_ns()
        outcome = await self._run(key.kind, self._write, lambda conn: self._put_sync(conn, key, value, size, now_ns))
        if outcome is None:
            return
        evicted, self.bytes_in_use = outcome
        for kind, count in evicted.items():
            self.metrics.result_cache_evictions.labels(kind).inc(count)
        self.metrics.result_cache_bytes.set(self.bytes_in_use)

    def _put_sync(
        self, conn: sqlite3.Connection, key: CacheKey, value: bytes, size: int, now_ns: int
    ) -> tuple[Counter[str], int]:
        (row_id,) = conn.execute(
            "INSERT INTO entries (key, kind, model, model_id, size, last_used) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET size = excluded.size, last_used = excluded.last_used RETURNING id",
            (key.digest, key.kind, key.model, key.model_id, size, now_ns),
        ).fetchall()[0]
        conn.execute("INSERT OR REPLACE INTO blobs (id, value) VALUES (?, ?)", (row_id, value))
        total = self._total(conn)
        evicted: Counter[str] = Counter()
        if total <= self.max_bytes:
            return evicted, total
        victims = []
        oldest = conn.execute("SELECT id, kind, size FROM entries WHERE key != ? ORDER BY last_used, id", (key.digest,))
        for row_id, kind, entry_size in oldest:
            victims.append((row_id,))
            evicted[kind] += 1
            total -= entry_size
            if total <= self.max_bytes:
                break
        oldest.close()
        conn.executemany("DELETE FROM entries WHERE id = ?", victims)
        return evicted, self._total(conn)

    async def stats(self) -> tuple[int, int]:
        """(entries, bytes) now in the file, whichever process wrote them (tests, diagnostics)."""
        def q() -> tuple[int, int]:
            conn = self._require_conn()
            return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0]), self._total(conn)

        return await self._db.run(q)
