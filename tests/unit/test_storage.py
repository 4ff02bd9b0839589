"""The storage folder (retention tiers, placement, cleanup, stats) and chunked uploads.
Pure unit tests: no Triton, no gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.jobs.files.storage import KEEP_MARKER, TIERS, CleanupReport, StorageConfig, StorageManager
import grpc

from server.jobs.files import uploads as uploads_module
from server.jobs.files.uploads import (
    UploadError,
    UploadInvalid,
    UploadNoSpace,
    UploadNotFound,
    UploadStore,
    UploadTooLarge,
    resolve_server_path,
    upload_status,
)
from server.metrics import Metrics

DAY = 24 * 3600.0
NOW = 2_000_000_000.0  # a fixed "now" for cleanup, well after any real file time


def make_file(path: Path, size: int = 10, age_s: float = 0.0, now: float = NOW) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))
    return path


def files_under(root: Path) -> list[Path]:
    """Every non-directory entry below root (symlinks included, not followed)."""
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        found.extend(Path(dirpath) / name for name in filenames)
    return sorted(found)


@pytest.fixture
def storage(tmp_path: Path) -> StorageManager:
    return StorageManager(StorageConfig(root=tmp_path / "storage"))


# ---------------------------------------------------------------------- config and paths


def test_config_defaults(tmp_path: Path) -> None:
    config = StorageConfig(root=tmp_path)
    assert TIERS == ("uploads", "processed", "videos", "temp")
    assert config.retention_s("uploads") == 7 * DAY
    assert config.retention_s("processed") == 3 * DAY
    assert config.retention_s("videos") == 30 * DAY
    assert config.retention_s("temp") == 3600
    assert config.cleanup_interval_s == 3600
    assert config.low_disk_bytes == 5 * 10**9
    with pytest.raises(ValueError):
        config.retention_s("nope")
    with pytest.raises(ValueError):
        StorageConfig(root=tmp_path, temp_retention_s=0)


def test_job_dir_validates_operation_names(storage: StorageManager) -> None:
    hex_id = uuid.uuid4().hex
    path = storage.job_dir(f"operations/{hex_id}")
    assert path == storage.root / "processed" / hex_id
    assert path.is_dir()
    assert storage.job_dir(f"operations/{hex_id}", "videos") == storage.root / "videos" / hex_id
    for bad in (
        hex_id,
        f"operations/{hex_id[:-1]}",
        f"operations/{hex_id}0",
        f"operations/{hex_id.upper()}",
        f"operations/{hex_id}/../x",
        "operations/../../etc",
        f"/operations/{hex_id}",
        f"operations/{hex_id}\n",
        "",
    ):
        with pytest.raises(ValueError):
            storage.job_dir(bad)
    with pytest.raises(ValueError):
        storage.job_dir(f"operations/{hex_id}", "elsewhere")


def test_temp_path_is_fresh_and_not_created(storage: StorageManager) -> None:
    a, b = storage.temp_path(".mp4"), storage.temp_path(".mp4")
    assert a != b
    assert a.parent == storage.root / "temp" and a.suffix == ".mp4"
    assert not a.exists()
    with pytest.raises(ValueError):
        storage.temp_path("/../x")


def test_expire_time(storage: StorageManager) -> None:
    created = datetime(2025, 1, 1, tzinfo=UTC)
    assert storage.expire_time("videos", created) == created + timedelta(days=30)
    assert storage.expire_time("temp", created) == created + timedelta(hours=1)


async def test_place_moves_atomically_and_restamps(storage: StorageManager) -> None:
    src = make_file(storage.temp_path(".bin"), size=123, age_s=10 * DAY, now=time.time())
    dest = await storage.place(src, "videos", "abc/out.bin")
    assert dest == storage.root / "videos" / "abc" / "out.bin"
    assert not src.exists()
    assert dest.read_bytes() == b"x" * 123
    # Retention starts at placement, not at the source's old modification time.
    assert abs(dest.stat().st_mtime - time.time()) < 60
    # Placing again replaces (idempotent re-runs).
    src2 = make_file(storage.temp_path(), size=5, now=time.time())
    assert await storage.place(src2, "videos", "abc/out.bin") == dest
    assert dest.read_bytes() == b"xxxxx"


def _trace_fsync_and_replace(monkeypatch: pytest.MonkeyPatch, *, cross_device: bool = False) -> list[tuple[str, str]]:
    """Records os.fsync (by path) and os.replace calls in order; ``cross_device`` makes a rename of a
    temp file fail with EXDEV, as a tier on another file system would."""
    trace: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        trace.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dest: str | Path) -> None:
        if cross_device and "/temp/" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        trace.append(("replace", str(dest)))
        real_replace(src, dest)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return trace


@pytest.mark.parametrize("cross_device", [False, True])
async def test_place_syncs_the_data_before_the_rename_and_the_folder_after(
    storage: StorageManager, monkeypatch: pytest.MonkeyPatch, cross_device: bool
) -> None:
    """A caller records a placed file in the store next (an artifact, an upload's meta.json): after a power
    loss the file must be there, whole."""
    src = make_file(storage.temp_path(".bin"), size=123, now=time.time())
    trace = _trace_fsync_and_replace(monkeypatch, cross_device=cross_device)
    dest = await storage.place(src, "videos", "abc/out.bin")
    assert dest.read_bytes() == b"x" * 123 and not src.exists()
    renamed = trace.index(("replace", str(dest)))
    synced_data = [path for kind, path in trace[:renamed] if kind == "fsync"]
    # The bytes that get the destination's name were synced: the source, or the copy made beside the destination.
    if cross_device:
        assert synced_data[-1].endswith(".part") and Path(synced_data[-1]).parent == dest.parent, trace
    else:
        assert synced_data[-1] == str(src), trace
    assert ("fsync", str(dest.parent)) in trace[renamed:]
    # abc/ was made for it: its own entry in the tier folder is synced too.
    assert ("fsync", str(storage.root / "videos")) in trace[renamed:]


@pytest.mark.parametrize("relative", ["../escape", "a/../../escape", "/abs/path", "a//b", "a/./b", "a/", "", "a\\b"])
async def test_place_rejects_unsafe_relative_paths(storage: StorageManager, relative: str) -> None:
    src = make_file(storage.temp_path(), now=time.time())
    with pytest.raises(ValueError):
        await storage.place(src, "videos", relative)
    assert src.exists()
    assert not (storage.root / "escape").exists()
    assert not (storage.root.parent / "escape").exists()


async def test_place_rejects_symlinked_folder_leaving_the_tier(storage: StorageManager, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (storage.tier_dir("videos") / "link").symlink_to(outside)
    src = make_file(storage.temp_path(), now=time.time())
    with pytest.raises(ValueError):
        await storage.place(src, "videos", "link/file")
    assert list(outside.iterdir()) == []


async def test_place_rejects_unknown_tier(storage: StorageManager) -> None:
    src = make_file(storage.temp_path(), now=time.time())
    with pytest.raises(ValueError):
        await storage.place(src, "archive", "a")


# ---------------------------------------------------------------------- cleanup


async def test_cleanup_respects_each_tiers_retention(storage: StorageManager) -> None:
    root = storage.root
    kept = [
        make_file(root / "temp" / "fresh.tmp", age_s=10),
        make_file(root / "temp" / "almost.tmp", age_s=3500),
        make_file(root / "processed" / "job1" / "fresh.png", age_s=2 * DAY),
        make_file(root / "uploads" / "u1" / "data", age_s=6 * DAY),
        make_file(root / "videos" / "job1" / "final.mp4", age_s=29 * DAY),
    ]
    removed = {
        "temp": [make_file(root / "temp" / "old.tmp", size=7, age_s=2 * 3600)],
        "processed": [
            make_file(root / "processed" / "job1" / "old.png", size=11, age_s=4 * DAY),
            make_file(root / "processed" / "job2" / "a" / "b.bin", size=13, age_s=4 * DAY),
        ],
        "uploads": [make_file(root / "uploads" / "u2" / "data", size=17, age_s=8 * DAY)],
        "videos": [make_file(root / "videos" / "job2" / "final.mp4", size=19, age_s=31 * DAY)],
    }
    report = await storage.cleanup_once(now=NOW)

    for path in kept:
        assert path.exists(), path
    for paths in removed.values():
        for path in paths:
            assert not path.exists(), path
    for tier, paths in removed.items():
        assert report.tiers[tier].files_removed == len(paths), tier
    assert {tier: r.bytes_removed for tier, r in report.tiers.items()} == {
        "uploads": 17,
        "processed": 11 + 13,
        "videos": 19,
        "temp": 7,
    }
    assert report.files_removed == 5
    assert report.bytes_removed == 7 + 11 + 13 + 17 + 19
    assert report.errors == 0
    # Folders emptied by the pass are gone; folders still holding files and the tiers stay.
    assert not (root / "processed" / "job2").exists()
    assert not (root / "uploads" / "u2").exists()
    assert not (root / "videos" / "job2").exists()
    assert (root / "processed" / "job1").is_dir()
    for tier in TIERS:
        assert (root / tier).is_dir()


async def test_cleanup_removes_stale_empty_dirs_but_not_fresh_ones(storage: StorageManager) -> None:
    fresh = storage.tier_dir("processed") / "just-created"
    stale = storage.tier_dir("processed") / "abandoned" / "deeper"
    fresh.mkdir()
    stale.mkdir(parents=True)
    os.utime(fresh, (NOW - 60, NOW - 60))
    for d in (stale, stale.parent):
        os.utime(d, (NOW - 5 * DAY, NOW - 5 * DAY))
    report = await storage.cleanup_once(now=NOW)
    assert fresh.is_dir()  # a job may be about to write its first file there
    assert not stale.parent.exists()
    assert report.tiers["processed"].dirs_removed == 2


async def test_cleanup_skips_kept_dirs(storage: StorageManager) -> None:
    job = storage.job_dir(f"operations/{uuid.uuid4().hex}")
    old = make_file(job / "frames" / "0001.png", age_s=10 * DAY)
    old_top = make_file(job / "state.json", age_s=10 * DAY)
    storage.keep(job)
    assert (job / KEEP_MARKER).exists()

    report = await storage.cleanup_once(now=NOW)
    assert old.exists() and old_top.exists()
    assert report.files_removed == 0

    storage.release(job)
    assert not (job / KEEP_MARKER).exists()
    report = await storage.cleanup_once(now=NOW)
    assert not old.exists() and not old_top.exists()
    assert not job.exists()
    assert report.tiers["processed"].files_removed == 2
    storage.release(job)  # releasing twice is harmless


def test_keep_refuses_paths_outside_the_root(storage: StorageManager, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        storage.keep(tmp_path / "elsewhere")
    with pytest.raises(ValueError):
        storage.keep(storage.root / ".." / "elsewhere")


async def test_cleanup_never_follows_symlinks_out_of_the_root(storage: StorageManager, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    victim = make_file(outside / "precious.txt", age_s=100 * DAY)
    dir_link = storage.tier_dir("temp") / "dir-link"
    file_link = storage.tier_dir("temp") / "file-link"
    dir_link.symlink_to(outside, target_is_directory=True)
    file_link.symlink_to(victim)
    for link in (dir_link, file_link):
        os.utime(link, (NOW - DAY, NOW - DAY), follow_symlinks=False)
    # A whole tier that is a symlink is not walked either.
    storage.root.joinpath("videos").symlink_to(outside, target_is_directory=True)

    await storage.cleanup_once(now=NOW)
    assert victim.exists()
    assert victim.read_bytes() == b"x" * 10
    # The old links themselves (inside the root) are removed, their targets are not.
    assert not os.path.lexists(dir_link) and not os.path.lexists(file_link)


# ---------------------------------------------------------------------- stats and metrics


async def test_stats_counts_files_and_flags_low_disk(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    storage = StorageManager(StorageConfig(root=tmp_path / "s", low_disk_bytes=10**18), metrics)
    make_file(storage.root / "uploads" / "u" / "data", size=100)
    make_file(storage.root / "uploads" / "u" / "meta.json", size=20)
    make_file(storage.root / "videos" / "j" / "final.mp4", size=1000)
    storage.keep(storage.root / "videos" / "j")  # the marker is not counted

    assert storage.low_disk is False  # nothing measured yet
    stats = await storage.stats()
    assert stats.tiers["uploads"].files == 2 and stats.tiers["uploads"].bytes == 120
    assert stats.tiers["videos"].files == 1 and stats.tiers["videos"].bytes == 1000
    assert stats.tiers["temp"].files == 0 and stats.tiers["processed"].bytes == 0
    assert stats.tiers["videos"].retention_seconds == 30 * DAY
    assert stats.total_files == 3 and stats.total_bytes == 1120
    assert 0 < stats.disk_free_bytes <= stats.disk_total_bytes
    assert stats.low_disk is True and storage.low_disk is True
    assert stats.low_disk_threshold_bytes == 10**18

    assert registry.get_sample_value("framewise_storage_bytes", {"tier": "uploads"}) == 120
    assert registry.get_sample_value("framewise_storage_files", {"tier": "videos"}) == 1
    assert registry.get_sample_value("framewise_storage_files", {"tier": "temp"}) == 0
    assert registry.get_sample_value("framewise_storage_disk_free_bytes") == stats.disk_free_bytes
    assert registry.get_sample_value("framewise_storage_low_disk") == 1


async def test_low_disk_false_with_a_zero_threshold(tmp_path: Path) -> None:
    storage = StorageManager(StorageConfig(root=tmp_path / "s", low_disk_bytes=0))
    await storage.cleanup_once()
    assert storage.low_disk is False
    assert (await storage.stats()).low_disk is False


# ---------------------------------------------------------------------- periodic task


async def test_free_space_is_checked_between_cleanups(tmp_path: Path) -> None:
    # Cleanup runs once an hour; the free-space check every disk_check_interval_s, so health follows a
    # disk that fills up (here: the threshold raised past the free space) or frees up within seconds.
    registry = CollectorRegistry()
    config = StorageConfig(root=tmp_path / "s", low_disk_bytes=0, cleanup_interval_s=3600, disk_check_interval_s=0.02)
    storage = StorageManager(config, Metrics(registry))
    await storage.start()
    try:
        await asyncio.sleep(0.1)
        assert storage.low_disk is False
        storage.config = dataclasses.replace(config, low_disk_bytes=10**18)
        for _ in range(200):
            if storage.low_disk:
                break
            await asyncio.sleep(0.01)
        assert storage.low_disk is True
        assert registry.get_sample_value("framewise_storage_low_disk") == 1
        storage.config = config
        for _ in range(200):
            if not storage.low_disk:
                break
            await asyncio.sleep(0.01)
        assert storage.low_disk is False
    finally:
        await storage.stop()


async def test_periodic_cleanup_runs_and_survives_errors(tmp_path: Path) -> None:
    storage = StorageManager(StorageConfig(root=tmp_path / "s", cleanup_interval_s=0.02))
    real_cleanup = storage.cleanup_once
    calls = 0

    async def flaky_cleanup(now: float | None = None) -> CleanupReport:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk on fire")
        return await real_cleanup(now)

    storage.cleanup_once = flaky_cleanup  # type: ignore[method-assign]
    await storage.start()
    await storage.start()  # no second task
    old = make_file(storage.root / "temp" / "old.tmp", age_s=2 * 3600, now=time.time())
    try:
        for _ in range(200):
            if not old.exists():
                break
            await asyncio.sleep(0.01)
        assert not old.exists()
        assert calls >= 2
    finally:
        await storage.stop()
    await storage.stop()  # stopping twice is harmless
    count = calls
    await asyncio.sleep(0.1)
    assert calls == count  # really stopped


# ---------------------------------------------------------------------- uploads


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i : i + size]


async def never_read() -> AsyncIterator[bytes]:
    raise AssertionError("the chunks must not be read when the header is invalid")
    yield b""  # pragma: no cover


@pytest.fixture
def uploads(storage: StorageManager) -> UploadStore:
    return UploadStore(storage, max_bytes=1 << 20, flush_bytes=64 * 1024)


async def test_upload_round_trip(storage: StorageManager, uploads: UploadStore) -> None:
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    info = await uploads.receive(1, "clip.mp4", len(data), sha.upper(), chunks_of(data, 40_000))

    assert len(info.upload_id) == 32 and int(info.upload_id, 16) >= 0
    assert (info.kind, info.filename, info.size_bytes, info.sha256) == (1, "clip.mp4", len(data), sha)
    assert info.path == storage.root / "uploads" / info.upload_id / "data"
    assert info.path.read_bytes() == data
    assert info.expire_time - info.create_time == timedelta(days=7)
    assert abs((info.create_time - datetime.now(UTC)).total_seconds()) < 60

    meta = json.loads((info.path.parent / "meta.json").read_text())
    assert meta["kind"] == 1 and meta["filename"] == "clip.mp4"
    assert meta["size_bytes"] == len(data) and meta["sha256"] == sha
    assert datetime.fromisoformat(meta["create_time"]) == info.create_time

    assert await uploads.get(info.upload_id) == info
    assert files_under(storage.root / "temp") == []

    await uploads.delete(info.upload_id)
    with pytest.raises(UploadNotFound):
        await uploads.get(info.upload_id)
    with pytest.raises(UploadNotFound):
        await uploads.delete(info.upload_id)


async def test_upload_with_wrong_sha_leaves_nothing(storage: StorageManager, uploads: UploadStore) -> None:
    data = b"hello world" * 1000
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(UploadInvalid) as caught:
        await uploads.receive(2, "a.png", len(data), wrong, chunks_of(data, 777))
    assert caught.value.field == "header.sha256"
    assert wrong in str(caught.value) and hashlib.sha256(data).hexdigest() in str(caught.value)
    assert files_under(storage.root) == []
    assert list((storage.root / "uploads").iterdir()) == []


async def test_a_disk_filling_up_during_an_upload_is_resource_exhausted_and_leaves_nothing(
    storage: StorageManager, uploads: UploadStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up after the first batch: the caller learns the server is out of space
    (RESOURCE_EXHAUSTED, retry later), not INTERNAL, and no path of the server is shown."""
    write_batch, batches = uploads_module._write_batch, []

    def filling_up(handle, hasher, batch, *, sync=False) -> None:  # noqa: ANN001
        if batches:
            raise OSError(errno.ENOSPC, "No space left on device", handle.name)
        batches.append(len(batch))
        write_batch(handle, hasher, batch, sync=sync)

    monkeypatch.setattr(uploads_module, "_write_batch", filling_up)
    data = os.urandom(300_000)
    with pytest.raises(UploadNoSpace) as caught:
        await uploads.receive(1, "clip.mp4", len(data), hashlib.sha256(data).hexdigest(), chunks_of(data, 40_000))
    status = upload_status(caught.value)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED and status.retry_after_s
    assert "out of disk space" in status.message and str(storage.root) not in status.message
    assert batches and files_under(storage.root) == []


async def test_upload_shorter_than_declared(storage: StorageManager, uploads: UploadStore) -> None:
    data = b"abc" * 100
    with pytest.raises(UploadInvalid) as caught:
        await uploads.receive(3, "a.wav", len(data) + 1, hashlib.sha256(data).hexdigest(), chunks_of(data, 50))
    assert caught.value.field == "header.size_bytes"
    assert files_under(storage.root) == []


async def test_upload_longer_than_declared_stops_early(storage: StorageManager, uploads: UploadStore) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b"z" * 100

    with pytest.raises(UploadInvalid, match="more bytes than header.size_bytes") as caught:
        await uploads.receive(1, "", 250, "0" * 64, endless())
    assert caught.value.field == "header.size_bytes"
    assert sent == 3  # stopped at the first chunk past the declared size
    assert files_under(storage.root) == []


@pytest.mark.parametrize(
    ("kind", "size", "sha", "error", "field"),
    [
        (1, (1 << 20) + 1, "0" * 64, UploadTooLarge, "header.size_bytes"),
        (1, 0, "0" * 64, UploadInvalid, "header.size_bytes"),
        (1, -5, "0" * 64, UploadInvalid, "header.size_bytes"),
        (0, 10, "0" * 64, UploadInvalid, "header.kind"),
        (1, 10, "0" * 63, UploadInvalid, "header.sha256"),
        (1, 10, "g" * 64, UploadInvalid, "header.sha256"),
        (1, 10, "", UploadInvalid, "header.sha256"),
    ],
)
async def test_upload_header_validation(
    storage: StorageManager, uploads: UploadStore, kind: int, size: int, sha: str, error: type[UploadError], field: str
) -> None:
    with pytest.raises(error) as caught:
        await uploads.receive(kind, "x", size, sha, never_read())
    assert caught.value.field == field
    assert field in str(caught.value)
    assert files_under(storage.root) == []


@pytest.mark.parametrize("upload_id", ["", "abc", "0" * 31, "0" * 33, "A" * 32, "../" + "0" * 29, "g" * 32])
async def test_upload_ids_are_validated(uploads: UploadStore, upload_id: str) -> None:
    with pytest.raises(UploadInvalid) as caught:
        await uploads.get(upload_id)
    assert caught.value.field == "upload_id"
    with pytest.raises(UploadInvalid):
        await uploads.delete(upload_id)


async def test_unknown_upload_is_not_found(uploads: UploadStore) -> None:
    with pytest.raises(UploadNotFound) as caught:
        await uploads.get(uuid.uuid4().hex)
    assert caught.value.field == "upload_id"


async def test_cancelled_upload_leaves_no_temp_file(storage: StorageManager, uploads: UploadStore) -> None:
    first_chunk_sent = asyncio.Event()
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield b"a" * 100_000  # more than flush_bytes: written to the temp file at once
        first_chunk_sent.set()
        await never.wait()
        yield b"b"  # pragma: no cover

    task = asyncio.create_task(uploads.receive(1, "v.mp4", 200_000, "0" * 64, stalls()))
    await asyncio.wait_for(first_chunk_sent.wait(), 5)
    for _ in range(100):
        if files_under(storage.root / "temp"):
            break
        await asyncio.sleep(0.01)
    assert len(files_under(storage.root / "temp")) == 1  # the partial upload exists meanwhile
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert files_under(storage.root) == []


# ---------------------------------------------------------------------- server-side paths


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    make_file(root / "videos" / "clip.mp4", now=time.time())
    make_file(tmp_path / "secret.mp4", now=time.time())
    (root / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    (root / "escape-dir").symlink_to(tmp_path, target_is_directory=True)
    (root / "inside.mp4").symlink_to(root / "videos" / "clip.mp4")
    return root


def test_server_path_good_file(media: Path) -> None:
    assert resolve_server_path(media, "videos/clip.mp4") == (media / "videos" / "clip.mp4").resolve()
    # A symlink that stays inside the root is fine.
    assert resolve_server_path(media, "inside.mp4") == (media / "videos" / "clip.mp4").resolve()


def test_server_paths_disabled_without_a_root() -> None:
    with pytest.raises(UploadInvalid, match="--media-root") as caught:
        resolve_server_path(None, "videos/clip.mp4")
    assert caught.value.field == "server_path"


@pytest.mark.parametrize(
    "relative",
    ["../secret.mp4", "videos/../../secret.mp4", "escape.mp4", "escape-dir/secret.mp4", "", "videos//clip.mp4"],
)
def test_server_path_traversal_is_invalid(media: Path, relative: str) -> None:
    with pytest.raises(UploadInvalid) as caught:
        resolve_server_path(media, relative)
    assert caught.value.field == "server_path"


def test_server_path_absolute_is_invalid(media: Path) -> None:
    with pytest.raises(UploadInvalid):
        resolve_server_path(media, str(media / "videos" / "clip.mp4"))


@pytest.mark.parametrize(
    "relative",
    [
        pytest.param("a" * 3000, id="one-part-over-NAME_MAX"),
        pytest.param("videos/" + "b" * 300 + ".mp4", id="last-part-over-NAME_MAX"),
        pytest.param("/".join(["c" * 250] * 17), id="whole-over-PATH_MAX"),
    ],
)
def test_server_path_too_long_is_invalid_and_not_echoed_whole(media: Path, relative: str) -> None:
    with pytest.raises(UploadInvalid, match="too long") as caught:
        resolve_server_path(media, relative)
    assert caught.value.field == "server_path"
    assert len(str(caught.value)) < 300 and str(media) not in str(caught.value)


def test_server_path_symlink_loop_is_invalid(media: Path) -> None:
    (media / "loop").symlink_to(media / "loop")
    with pytest.raises(UploadInvalid, match="loops") as caught:
        resolve_server_path(media, "loop/clip.mp4")
    assert caught.value.field == "server_path"


@pytest.mark.parametrize("relative", ["videos/missing.mp4", "videos"])
def test_server_path_missing_or_not_a_file(media: Path, relative: str) -> None:
    with pytest.raises(UploadNotFound) as caught:
        resolve_server_path(media, relative)
    assert caught.value.field == "server_path"
