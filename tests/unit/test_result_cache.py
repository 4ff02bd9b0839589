"""server/cache: the SQLite result cache shared by a replica's processes (LRU by bytes, keys)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from framewise.v1 import common_pb2
from server.cache.keys import CacheKey, entry_key, image_digest, model_id
from server.cache.result_cache import ENTRY_OVERHEAD_BYTES, ResultCache, result_cache_for, result_cache_path
from server.config import parse_args
from server.metrics import Metrics
from server.triton.model_spec import ModelSpec, TensorSpec
from server.vision.image_decode import DecodedImage
from tests.conftest import REPO

YOLO = ModelSpec(
    name="yolov8",
    version="1",
    backend="python",
    max_batch_size=8,
    inputs=(TensorSpec("images", "UINT8", (-1, 640, 640, 3)),),
    outputs=(TensorSpec("output0", "FP32", (-1, 84, 8400)),),
    parameters={"source": "yolov8n_int8.onnx sha256:aaaa", "stand_in": "false"},
)
IMAGE = common_pb2.Image(encoded=b"\xff\xd8 not really a jpeg, the cache never decodes")
VALUE = 1000  # bytes per test value: every entry costs VALUE + ENTRY_OVERHEAD_BYTES


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def open_cache(path: Path, entries: int = 3, **kwargs) -> tuple[ResultCache, Metrics]:  # noqa: ANN003
    metrics = Metrics(CollectorRegistry())
    cache = ResultCache(path, max_bytes=entries * (VALUE + ENTRY_OVERHEAD_BYTES), metrics=metrics, **kwargs)
    return await cache.open(), metrics


async def key_of(cache: ResultCache, name: str, spec: ModelSpec = YOLO, kind: str = "detection") -> CacheKey:
    return await cache.key(kind, spec, common_pb2.Image(encoded=name.encode()), {"confidence": 0.25})


def value_of(name: str) -> bytes:
    return name.encode().ljust(VALUE, b".")


def test_a_stored_value_comes_back_identical_and_counts_a_hit(tmp_path: Path) -> None:
    async def main() -> None:
        cache, metrics = await open_cache(tmp_path / "c.sqlite3")
        key = await key_of(cache, "a")
        assert await cache.get(key) is None
        value = bytes(range(256)) * 4
        await cache.put(key, value)
        assert await cache.get(key) == value
        assert sample(metrics, "framewise_result_cache_misses_total", kind="detection") == 1
        assert sample(metrics, "framewise_result_cache_hits_total", kind="detection") == 1
        assert sample(metrics, "framewise_result_cache_bytes") == len(value) + ENTRY_OVERHEAD_BYTES
        await cache.close()

    run(main())


def test_lru_by_bytes_evicts_the_least_recently_used_first(tmp_path: Path) -> None:
    async def main() -> None:
        cache, metrics = await open_cache(tmp_path / "c.sqlite3", entries=3)
        keys = {name: await key_of(cache, name) for name in "abcde"}
        for name in "abc":
            await cache.put(keys[name], value_of(name))
        assert await cache.stats() == (3, 3 * (VALUE + ENTRY_OVERHEAD_BYTES))
        # Reading "a" makes it the most recently used: "b" is now the oldest.
        assert await cache.get(keys["a"]) == value_of("a")
        await cache.put(keys["d"], value_of("d"))
        assert await cache.get(keys["b"]) is None
        assert [await cache.get(keys[n]) is not None for n in "acd"] == [True, True, True]
        # Those reads were in the order a, c, d: "a" is now the least recently used.
        await cache.put(keys["e"], value_of("e"))
        assert await cache.get(keys["a"]) is None
        assert [await cache.get(keys[n]) is not None for n in "cde"] == [True, True, True]
        assert sample(metrics, "framewise_result_cache_evictions_total", kind="detection") == 2
        entries, total = await cache.stats()
        assert entries == 3 and total == cache.bytes_in_use <= cache.max_bytes
        await cache.close()

    run(main())


def test_a_big_value_evicts_as_many_as_needed_and_one_over_the_bound_is_not_stored(tmp_path: Path) -> None:
    async def main() -> None:
        cache, metrics = await open_cache(tmp_path / "c.sqlite3", entries=4)
        keys = {name: await key_of(cache, name, kind="matting") for name in ("a", "b", "c", "d", "big", "huge")}
        for name in "abcd":
            await cache.put(keys[name], value_of(name))
        # Room for three entries' worth: the three oldest go, in one transaction with the insert.
        await cache.put(keys["big"], b"x" * (3 * VALUE + 2 * ENTRY_OVERHEAD_BYTES))
        assert [await cache.get(keys[n]) is not None for n in ("a", "b", "c", "d", "big")] == [False, False, False, True, True]
        assert sample(metrics, "framewise_result_cache_evictions_total", kind="matting") == 3
        await cache.put(keys["huge"], b"x" * cache.max_bytes)
        assert await cache.get(keys["huge"]) is None
        assert await cache.get(keys["big"]) is not None, "an entry too big to keep must not empty the cache"
        await cache.close()

    run(main())


def test_replacing_an_entry_keeps_the_byte_total_exact(tmp_path: Path) -> None:
    async def main() -> None:
        cache, _ = await open_cache(tmp_path / "c.sqlite3", entries=3)
        key = await key_of(cache, "a")
        await cache.put(key, b"1" * 500)
        await cache.put(key, b"2" * 900)
        assert await cache.get(key) == b"2" * 900
        assert await cache.stats() == (1, 900 + ENTRY_OVERHEAD_BYTES)
        await cache.close()

    run(main())


def test_two_connections_share_entries_and_the_bound(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "c.sqlite3"
        first, _ = await open_cache(path, entries=2)
        second, second_metrics = await open_cache(path, entries=2)
        keys = {name: await key_of(first, name) for name in "abc"}
        await first.put(keys["a"], value_of("a"))
        assert await second.get(keys["a"]) == value_of("a")
        await second.put(keys["b"], value_of("b"))
        await first.put(keys["c"], value_of("c"))  # evicts "a": the bound covers both writers
        assert await second.get(keys["a"]) is None
        assert await second.get(keys["b"]) == value_of("b")
        assert await second.stats() == (2, 2 * (VALUE + ENTRY_OVERHEAD_BYTES))
        assert sample(second_metrics, "framewise_result_cache_hits_total", kind="detection") == 2
        await first.close()
        await second.close()

    run(main())


_OTHER_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from prometheus_client import CollectorRegistry
    from server.metrics import Metrics
    from server.cache.result_cache import ResultCache
    from tests.unit.test_result_cache import YOLO, VALUE, ENTRY_OVERHEAD_BYTES, key_of

    async def main():
        cache = await ResultCache(Path(sys.argv[1]), max_bytes=10 * (VALUE + ENTRY_OVERHEAD_BYTES),
                                  metrics=Metrics(CollectorRegistry())).open()
        found = await cache.get(await key_of(cache, "from-parent"))
        await cache.put(await key_of(cache, "from-child"), b"child wrote this")
        await cache.close()
        print(found.decode() if found else "MISS")

    asyncio.run(main())
    """
)


def test_two_processes_share_entries(tmp_path: Path) -> None:
    """As the serving process (RPCs) and the job worker process (jobs) of one replica do."""

    async def main() -> None:
        path = tmp_path / "c.sqlite3"
        cache, _ = await open_cache(path, entries=10)
        await cache.put(await key_of(cache, "from-parent"), b"parent wrote this")
        child = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", _OTHER_PROCESS, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == "parent wrote this"
        assert await cache.get(await key_of(cache, "from-child")) == b"child wrote this"
        await cache.close()

    run(main())


def test_key_changes_with_model_version_weights_tensors_and_parameters() -> None:
    content = image_digest(IMAGE)
    params = {"confidence": 0.25, "iou": 0.45, "max": 100, "classes": [0]}
    base = entry_key("detection", YOLO, model_id(YOLO), content, params).digest
    # An equal spec read again (a new object after a Triton restart with the same model): same key.
    same = dataclasses.replace(YOLO, parameters=dict(YOLO.parameters))
    assert entry_key("detection", same, model_id(same), content, params).digest == base
    variants = [
        dataclasses.replace(YOLO, version="2"),
        dataclasses.replace(YOLO, parameters={**YOLO.parameters, "source": "yolov8n_int8.onnx sha256:bbbb"}),
        dataclasses.replace(YOLO, inputs=(TensorSpec("images", "UINT8", (-1, 320, 320, 3)),)),
        dataclasses.replace(YOLO, name="yolov8-other"),
    ]
    for spec in variants:
        assert entry_key("detection", spec, model_id(spec), content, params).digest != base, spec
    for changed in ({**params, "confidence": 0.5}, {**params, "iou": 0.5}, {**params, "max": 1}, {**params, "classes": None}):
        assert entry_key("detection", YOLO, model_id(YOLO), content, changed).digest != base, changed
    assert entry_key("matting", YOLO, model_id(YOLO), content, params).digest != base
    assert entry_key("detection", YOLO, model_id(YOLO), image_digest(common_pb2.Image(encoded=b"other")), params).digest != base


def test_image_digest_tells_apart_encoded_raw_formats_sizes_and_decoded_pixels() -> None:
    data = bytes(range(12))
    raw = lambda w, h, f: common_pb2.Image(raw=common_pb2.RawFrame(width=w, height=h, pixel_format=f, data=data))  # noqa: E731
    digests = [
        image_digest(common_pb2.Image(encoded=data)),
        image_digest(raw(2, 2, common_pb2.PIXEL_FORMAT_RGB8)),
        image_digest(raw(2, 2, common_pb2.PIXEL_FORMAT_BGR8)),
        image_digest(raw(4, 1, common_pb2.PIXEL_FORMAT_RGB8)),
        image_digest(DecodedImage(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 2, 2)),
        image_digest(DecodedImage(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 4, 4)),  # a reduced decode
        image_digest(common_pb2.Image()),
    ]
    assert len(set(digests)) == len(digests)
    assert image_digest(raw(2, 2, common_pb2.PIXEL_FORMAT_RGB8)) == digests[1]


def test_a_reloaded_model_gets_new_keys_and_its_old_entries_are_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        cache, _ = await open_cache(tmp_path / "c.sqlite3", entries=10)
        old = await key_of(cache, "a")
        await cache.put(old, value_of("a"))
        matting = dataclasses.replace(YOLO, name="matting")
        await cache.put(await key_of(cache, "a", matting, kind="matting"), value_of("m"))
        # The same spec object or an equal one: the same key, still a hit.
        assert await key_of(cache, "a", dataclasses.replace(YOLO)) == old
        assert await cache.get(old) == value_of("a")
        reloaded = dataclasses.replace(YOLO, version="2")
        new = await key_of(cache, "a", reloaded)
        assert new.digest != old.digest
        assert await cache.get(new) is None
        # The lookup that saw the new spec dropped the old model's entry first; other models keep theirs.
        assert await cache.stats() == (1, VALUE + ENTRY_OVERHEAD_BYTES)
        assert await cache.get(old) is None
        await cache.close()

    run(main())


def test_clear_on_open_starts_empty(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "c.sqlite3"
        cache, _ = await open_cache(path)
        await cache.put(await key_of(cache, "a"), value_of("a"))
        await cache.close()
        kept, _ = await open_cache(path)
        assert (await kept.stats())[0] == 1
        await kept.close()
        cleared = await ResultCache(path, max_bytes=10_000, metrics=Metrics(CollectorRegistry())).open(clear=True)
        assert await cleared.stats() == (0, 0)
        await cleared.close()

    run(main())


def test_a_locked_cache_is_a_miss_not_an_error(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "c.sqlite3"
        cache, metrics = await open_cache(path, busy_timeout_ms=50)
        key = await key_of(cache, "a")
        await cache.put(key, value_of("a"))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock too long
        try:
            assert await cache.get(key) is None
            await cache.put(await key_of(cache, "b"), value_of("b"))  # skipped, no exception
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert sample(metrics, "framewise_result_cache_errors_total", kind="detection") == 2
        assert await cache.get(key) == value_of("a"), "the cache works again once the lock is gone"
        await cache.close()

    run(main())


def test_config_flag_sizes_the_cache_and_zero_disables_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metrics = Metrics(CollectorRegistry())
    config = parse_args(["--storage-root", str(tmp_path), "--result-cache-bytes", "1048576"])
    cache = result_cache_for(config, metrics)
    assert cache is not None and cache.max_bytes == 1048576 and cache.path == result_cache_path(config)
    assert cache.path.is_relative_to(tmp_path)
    assert parse_args([]).result_cache_bytes == 256 * 1024**2
    assert result_cache_for(parse_args(["--result-cache-bytes", "0"]), metrics) is None
    with pytest.raises(SystemExit):
        parse_args(["--result-cache-bytes", "-1"])
    assert "--result-cache-bytes must be >= 0" in capsys.readouterr().err


def test_what_a_hit_costs(tmp_path: Path) -> None:
    """Not a timed test (no threshold): prints what a lookup costs here, for the record."""

    async def main() -> None:
        cache, _ = await open_cache(tmp_path / "c.sqlite3", entries=1000)
        key = await key_of(cache, "a", kind="matting")
        value = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
        await cache.put(key, value)
        started = time.perf_counter()
        for _ in range(200):
            assert await cache.get(key) == value
        hit_ms = (time.perf_counter() - started) / 200 * 1e3
        started = time.perf_counter()
        for _ in range(200):
            await cache.key("matting", YOLO, IMAGE, {"box": [0, 0, 10, 10]})
        key_ms = (time.perf_counter() - started) / 200 * 1e3
        print(f"\nresult cache: get of a 200 kB value {hit_ms:.3f} ms, key of a small image {key_ms:.3f} ms")
        await cache.close()

    run(main())


def test_replicas_sharing_a_storage_root_each_get_their_own_cache_file(tmp_path: Path) -> None:
    """A PostgreSQL job store means replicas share the storage root: each replica's file is its
    own (one shared file, emptied by each replica as it started, broke the others' open)."""
    root = ["--storage-root", str(tmp_path)]
    shared = "postgresql://framewise@127.0.0.1:5432/jobs"
    one = result_cache_path(parse_args([*root, "--job-store", shared, "--replica-id", "replica-1"]))
    two = result_cache_path(parse_args([*root, "--job-store", shared, "--replica-id", "replica-2"]))
    odd = result_cache_path(parse_args([*root, "--job-store", shared, "--replica-id", "../x y"]))
    assert one != two and one.parent == two.parent == odd.parent == tmp_path / "cache"
    assert odd.name == "results-.._x_y.sqlite3"
    alone = parse_args([*root, "--job-store", str(tmp_path / "jobs.sqlite3"), "--replica-id", "replica-1"])
    assert result_cache_path(alone) == tmp_path / "cache" / "results.sqlite3"
