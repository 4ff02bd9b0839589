"""The storage folder of long-running jobs: retention tiers, atomic placement and cleanup.

Layout under ``StorageConfig.root``::

    uploads/<upload id>/data, meta.json      client uploads             (7 days)
    processed/<operation hex>/...            per-job working folders    (3 days)
    videos/<operation hex>/...               final artifacts            (30 days)
    temp/<random>                            files being written        (1 hour)

Rules every writer follows, so that a reader never sees half a file and cleanup never pulls a
file from under a running job:

* Write into ``temp_path()`` (or into a job's own working folder), then ``place()`` the finished
  file into its tier: ``os.replace`` on the same file system, so the destination either does
  not exist or is complete.
* Retention is by modification time: a file older than its tier's retention is deleted by
  ``cleanup_once``. ``place()`` stamps the file with the current time, so the retention of a
  placed file starts when it is placed, as ``expire_time(tier, now)`` promises the client.
* A folder holding a ``.keep`` marker (``keep(dir)`` / ``release(dir)``) is skipped whole,
  sub-folders included: a running job keeps its working folder (and the upload it reads).

The file-system walks run in a thread, so the event loop only waits for their result.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from server.aio import cancel_and_wait
from server.jobs.files.durable import fsync_path

__all__ = [
    "KEEP_MARKER",
    "TIERS",
    "CleanupReport",
    "StorageConfig",
    "StorageManager",
    "StorageMetrics",
    "StorageStats",
    "TierCleanup",
    "TierStats",
    "validate_relative_path",
]

log = logging.getLogger("server.jobs.files.storage")

TIERS = ("uploads", "processed", "videos", "temp")
# Name of the marker file that protects a folder (and everything below it) from cleanup.
KEEP_MARKER = ".keep"

_DAY_S = 24 * 3600.0
_OPERATION_NAME = re.compile(r"operations/([0-9a-f]{32})")


@dataclass(frozen=True)
class StorageConfig:
    """Where the storage folder lives and how long each tier keeps its files (seconds)."""

    root: Path
    uploads_retention_s: float = 7 * _DAY_S
    processed_retention_s: float = 3 * _DAY_S
    videos_retention_s: float = 30 * _DAY_S
    temp_retention_s: float = 3600.0
    cleanup_interval_s: float = 3600.0
    # Below this many free bytes on the root's file system, ``low_disk`` turns true.
    low_disk_bytes: int = 5 * 10**9
    # Free space is checked this often (a statvfs: cheap), apart from the cleanup passes, so
    # health follows a filling (or freed) disk within seconds rather than a cleanup interval.
    disk_check_interval_s: float = 10.0

    def __post_init__(self) -> None:
        for tier in TIERS:
            if self.retention_s(tier) <= 0:
                raise ValueError(f"{tier}_retention_s must be positive")
        if self.cleanup_interval_s <= 0 or self.disk_check_interval_s <= 0:
            raise ValueError("cleanup_interval_s and disk_check_interval_s must be positive")
        if self.low_disk_bytes < 0:
            raise ValueError("low_disk_bytes must not be negative")

    def retention_s(self, tier: str) -> float:
        _check_tier(tier)
        value: float = getattr(self, f"{tier}_retention_s")
        return value


@dataclass(frozen=True)
class TierCleanup:
    files_removed: int = 0
    bytes_removed: int = 0
    dirs_removed: int = 0


@dataclass(frozen=True)
class CleanupReport:
    """What one cleanup pass removed, per tier; ``errors`` counts entries it could not remove."""

    tiers: Mapping[str, TierCleanup]
    errors: int = 0

    @property
    def files_removed(self) -> int:
        return sum(t.files_removed for t in self.tiers.values())

    @property
    def bytes_removed(self) -> int:
        return sum(t.bytes_removed for t in self.tiers.values())


@dataclass(frozen=True)
class TierStats:
    files: int
    bytes: int
    retention_seconds: float


@dataclass(frozen=True)
class StorageStats:
    tiers: Mapping[str, TierStats]
    disk_free_bytes: int
    disk_total_bytes: int
    low_disk: bool
    low_disk_threshold_bytes: int

    @property
    def total_files(self) -> int:
        return sum(t.files for t in self.tiers.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tiers.values())


class _Settable(Protocol):
    def set(self, value: float) -> None: ...


class _Labelled(Protocol):
    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> _Settable: ...


class StorageMetrics(Protocol):
    """The gauges the manager reports to (``server.metrics.Metrics`` has them)."""

    @property
    def storage_bytes(self) -> _Labelled: ...

    @property
    def storage_files(self) -> _Labelled: ...

    @property
    def disk_free_bytes(self) -> _Settable: ...

    @property
    def low_disk(self) -> _Settable: ...


def validate_relative_path(relative: str) -> PurePosixPath:
    """Checks a path that must stay below a folder: relative, "/"-separated, no "..", "." or
    empty parts (so no trailing "/"), no NUL or backslash. Raises ValueError naming the problem.

    Checked on the string rather than after normalisation because normalising hides exactly the
    tricks ("a/../../b", "a//b") a caller should be told about."""
    if not relative:
        raise ValueError("path is empty")
    if "\x00" in relative or "\\" in relative:
        raise ValueError("path contains a NUL or backslash character")
    if relative.startswith("/"):
        raise ValueError("path must be relative")
    parts = relative.split("/")
    if ".." in parts:
        raise ValueError('path must not contain ".."')
    if any(part in ("", ".") for part in parts):
        raise ValueError('path must not contain empty or "." parts')
    return PurePosixPath(relative)


def _check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise ValueError(f"unknown storage tier {tier!r}; expected one of {', '.join(TIERS)}")


class StorageManager:
    """Owns the storage root: hands out folders and temp paths, places finished files, and
    enforces retention with a periodic cleanup task (``start`` / ``stop``)."""

    def __init__(
        self,
        config: StorageConfig,
        metrics: StorageMetrics | None = None,
        *,
        duty: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """``duty``: asked before each periodic cleanup pass whether this replica runs it (one
        storage root shared by replicas is swept by one of them: JobStore.try_cluster_duty);
        None: always."""
        self.config = config
        self.duty = duty
        self._metrics = metrics
        self._low_disk = False
        self._cleanup_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._disk_task: asyncio.Task[None] | None = None

    @property
    def root(self) -> Path:
        return self.config.root

    @property
    def low_disk(self) -> bool:
        """Free space below ``low_disk_bytes`` at the last check (every ``disk_check_interval_s``
        while started, and at every ``stats()`` or ``cleanup_once()``)."""
        return self._low_disk

    # ---------------------------------------------------------------- paths

    def tier_dir(self, tier: str) -> Path:
        _check_tier(tier)
        path = self.config.root / tier
        path.mkdir(parents=True, exist_ok=True)
        return path

    def job_dir(self, operation_name: str, tier: str = "processed") -> Path:
        """``operations/<32 hex>`` -> ``<root>/<tier>/<hex>/`` (created). The name is checked
        strictly because it becomes a path."""
        match = _OPERATION_NAME.fullmatch(operation_name)
        if match is None:
            raise ValueError(f"not an operation name: {operation_name!r} (expected operations/<32 lowercase hex>)")
        path = self.tier_dir(tier) / match.group(1)
        path.mkdir(exist_ok=True)
        return path

    def temp_path(self, suffix: str = "") -> Path:
        """A fresh path in the temp tier (not created): write there, then ``place()`` it."""
        if "/" in suffix or "\\" in suffix or "\x00" in suffix:
            raise ValueError("suffix must not contain path separators")
        return self.tier_dir("temp") / f"{uuid.uuid4().hex}{suffix}"

    def expire_time(self, tier: str, created: datetime) -> datetime:
        return created + timedelta(seconds=self.config.retention_s(tier))

    def keep(self, directory: Path) -> None:
        """Protects ``directory`` (inside the root) and everything below it from cleanup."""
        directory = self._inside_root(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / KEEP_MARKER).touch()

    def release(self, directory: Path) -> None:
        """Undoes ``keep``: the folder ages normally again (by its files' modification times)."""
        (self._inside_root(directory) / KEEP_MARKER).unlink(missing_ok=True)

    def _inside_root(self, path: Path) -> Path:
        root = self.config.root.resolve()
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"{path} is not inside the storage root")
        return resolved

    # ---------------------------------------------------------------- placement

    async def place(self, src: Path, tier: str, relative: str) -> Path:
        """Moves the finished file ``src`` to ``<root>/<tier>/<relative>`` atomically and
        returns the destination; an existing file there is replaced (re-runs stay idempotent)."""
        rel = validate_relative_path(relative)
        tier_dir = self.tier_dir(tier)
        return await asyncio.to_thread(self._place_sync, src, tier_dir, rel)

    @staticmethod
    def _place_sync(src: Path, tier_dir: Path, rel: PurePosixPath) -> Path:
        dest = tier_dir.joinpath(*rel.parts)
        new_folders = []  # the folders mkdir makes here: their names are synced with the file's
        folder = dest.parent
        while not folder.exists():
            new_folders.append(folder)
            folder = folder.parent
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A symlinked folder inside the tier must not carry the file out of the root.
        if not dest.parent.resolve().is_relative_to(tier_dir.resolve()):
            raise ValueError(f"{rel} leaves the {tier_dir.name} tier")
        # The file's data, then its new name, reach the disk before the caller records it (an
        # artifact row, an upload's meta.json): see server/jobs/files/durable.py.
        fsync_path(src)
        try:
            os.replace(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Another file system: copy next to the destination, then rename, so the
            # destination still appears complete or not at all.
            part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
            try:
                shutil.copyfile(src, part)
                fsync_path(part)
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
            src.unlink()
        os.utime(dest)
        for folder in (dest, *new_folders):
            fsync_path(folder.parent)
        return dest

    # ---------------------------------------------------------------- cleanup and stats

    async def cleanup_once(self, now: float | None = None) -> CleanupReport:
        """Deletes files older than their tier's retention, then the folders this left empty
        (and stale empty folders); never enters ``.keep`` folders or follows symlinks."""
        when = time.time() if now is None else now
        async with self._cleanup_lock:
            report = await asyncio.to_thread(self._cleanup_sync, when)
        for tier, removed in report.tiers.items():
            if removed.files_removed or removed.dirs_removed:
                log.info(
                    "storage cleanup: %s: removed %d files (%d bytes) and %d folders",
                    tier,
                    removed.files_removed,
                    removed.bytes_removed,
                    removed.dirs_removed,
                )
        if report.errors:
            log.warning("storage cleanup: %d entries could not be removed", report.errors)
        await self._refresh_disk()
        return report

    def _cleanup_sync(self, now: float) -> CleanupReport:
        tiers: dict[str, TierCleanup] = {}
        errors = 0
        for tier in TIERS:
            sweep = _Sweep(cutoff=now - self.config.retention_s(tier))
            top = self._walkable_tier(tier)
            if top is not None:
                sweep.directory(top, is_top=True)
            tiers[tier] = TierCleanup(sweep.files, sweep.bytes, sweep.dirs)
            errors += sweep.errors
        return CleanupReport(tiers=tiers, errors=errors)

    def _walkable_tier(self, tier: str) -> Path | None:
        """The tier's folder, or None when it is missing or is a symlink/other file: a tier
        pointing elsewhere is never walked, so cleanup cannot delete outside the root."""
        path = self.config.root / tier
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(mode):
            log.warning("storage tier %s is not a plain folder (symlink?); not walking it", path)
            return None
        return path

    async def stats(self, owned: Mapping[str, Collection[str]] | None = None) -> StorageStats:
        """Files and bytes per tier plus free disk space; updates the gauges when given.

        ``owned``: one tenant's share only: per tier, the names of the top-level entries that
        are its own (upload ids, operation hex folders); a tier it does not name counts nothing.
        The gauges stay the whole server's (they are not updated from a share)."""
        counts = await asyncio.to_thread(self._count_sync, owned)
        usage = await asyncio.to_thread(shutil.disk_usage, self._existing_root())
        threshold = self.config.low_disk_bytes
        result = StorageStats(
            tiers={
                tier: TierStats(files=files, bytes=size, retention_seconds=self.config.retention_s(tier))
                for tier, (files, size) in counts.items()
            },
            disk_free_bytes=usage.free,
            disk_total_bytes=usage.total,
            low_disk=usage.free < threshold,
            low_disk_threshold_bytes=threshold,
        )
        self._set_low_disk(usage.free)
        if self._metrics is not None and owned is None:
            for tier, tier_stats in result.tiers.items():
                self._metrics.storage_files.labels(tier=tier).set(tier_stats.files)
                self._metrics.storage_bytes.labels(tier=tier).set(tier_stats.bytes)
        return result

    def _count_sync(self, owned: Mapping[str, Collection[str]] | None = None) -> dict[str, tuple[int, int]]:
        counts: dict[str, tuple[int, int]] = {}
        for tier in TIERS:
            files = size = 0
            top = self._walkable_tier(tier)
            if top is not None:
                if owned is None:
                    tops = [top]
                else:
                    # Plain names only: a name is a folder directly under the tier, never a path.
                    tops = [top / n for n in sorted(set(owned.get(tier, ()))) if n and "/" not in n and n not in (".", "..")]
                for start in tops:
                    f, b = _count_tree(start)
                    files += f
                    size += b
            counts[tier] = (files, size)
        return counts

    def _existing_root(self) -> Path:
        self.config.root.mkdir(parents=True, exist_ok=True)
        return self.config.root

    async def _refresh_disk(self) -> None:
        usage = await asyncio.to_thread(shutil.disk_usage, self._existing_root())
        self._set_low_disk(usage.free)

    def _set_low_disk(self, free: int) -> None:
        low = free < self.config.low_disk_bytes
        if low and not self._low_disk:
            log.warning(
                "storage: low disk space under %s: %d bytes free (threshold %d)",
                self.config.root,
                free,
                self.config.low_disk_bytes,
            )
        self._low_disk = low
        if self._metrics is not None:
            self._metrics.disk_free_bytes.set(free)
            self._metrics.low_disk.set(1 if low else 0)

    # ---------------------------------------------------------------- periodic task

    async def start(self) -> None:
        """Creates the tiers and starts the periodic cleanup (first pass at once: a server that
        was down for a while catches up immediately). Starting twice is a no-op."""
        if self._task is not None and not self._task.done():
            return
        for tier in TIERS:
            self.tier_dir(tier)
        self._task = asyncio.create_task(self._run(), name="storage-cleanup")
        self._disk_task = asyncio.create_task(self._watch_disk(), name="storage-disk-check")

    async def stop(self) -> None:
        tasks, self._task, self._disk_task = (self._task, self._disk_task), None, None
        for task in tasks:
            await cancel_and_wait(task)

    async def _watch_disk(self) -> None:
        while True:
            await asyncio.sleep(self.config.disk_check_interval_s)
            try:
                await self._refresh_disk()
            except Exception:  # the loop must outlive any one failed check
                log.exception("storage: free-space check failed")

    async def _run(self) -> None:
        while True:
            try:
                if self.duty is None or await self.duty():
                    await self.cleanup_once()
                await self.stats()
            except Exception:
                # A full disk or a permission problem must not end retention for good.
                log.exception("storage cleanup pass failed")
            await asyncio.sleep(self.config.cleanup_interval_s)


def _count_tree(top: Path) -> tuple[int, int]:
    """Regular files (but the keep markers) under ``top`` and their bytes; 0 when it is missing."""
    files = size = 0
    # os.walk does not descend into symlinked folders (followlinks=False); a missing top yields
    # nothing.
    for dirpath, _dirnames, filenames in os.walk(top):
        for name in filenames:
            if name == KEEP_MARKER:
                continue
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size


@dataclass
class _Sweep:
    """One tier's cleanup walk (runs in a thread), with what it removed."""

    cutoff: float
    files: int = 0
    bytes: int = 0
    dirs: int = 0
    errors: int = 0
    _seen: set[tuple[int, int]] = field(default_factory=set)

    def directory(self, path: Path, *, is_top: bool = False) -> bool:
        """Sweeps ``path``; returns True when it should be removed (empty, and either emptied
        by this pass or itself older than the cutoff). A fresh empty folder survives: a job
        may have just created it and not written its first file yet."""
        if os.path.lexists(path / KEEP_MARKER):
            return False
        removed_any = False
        remaining = 0
        try:
            entries = list(os.scandir(path))
        except OSError as exc:
            log.warning("storage cleanup: cannot list %s: %s", path, exc)
            self.errors += 1
            return False
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError:
                self.errors += 1
                remaining += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                # Guards against bind-mount loops; symlinks are never S_ISDIR with lstat.
                key = (st.st_dev, st.st_ino)
                if key in self._seen:
                    remaining += 1
                    continue
                self._seen.add(key)
                child = Path(entry.path)
                if self.directory(child):
                    try:
                        os.rmdir(child)
                    except OSError:
                        remaining += 1  # something was written into it meanwhile
                    else:
                        self.dirs += 1
                        removed_any = True
                else:
                    remaining += 1
                continue
            if st.st_mtime >= self.cutoff:
                remaining += 1
                continue
            try:
                os.unlink(entry.path)  # a symlink is removed itself, never its target
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("storage cleanup: cannot remove %s: %s", entry.path, exc)
                self.errors += 1
                remaining += 1
                continue
            removed_any = True
            self.files += 1
            if stat.S_ISREG(st.st_mode):
                self.bytes += st.st_size
        if is_top or remaining:
            return False
        if removed_any:
            return True
        try:
            return os.lstat(path).st_mtime < self.cutoff
        except OSError:
            return False
