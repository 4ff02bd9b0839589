"""The tracking-session registry (server/sam2/session_registry.py): session keys, drain and handoff
through a real job store (SQLite here; the contract suite runs the store methods on PostgreSQL
too, and tests/e2e/test_session_handoff.py drains real replicas on PostgreSQL). Registries stand for
replicas: two registries on one store are two replicas sharing it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.errors import ServiceError
from server.jobs.store.sqlite import SqliteJobStore
from server.metrics import Metrics
from server.sam2.samurai import CandidateSelector, MemoryBank, SamuraiConfig
from server.sam2.session import TrackedObject, dump_session
from server.sam2.session_registry import SessionRegistry


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteJobStore]:
    store = await SqliteJobStore(tmp_path / "jobs.db").open()
    yield store
    await store.close()


def replica(store: SqliteJobStore | None, name: str, max_sessions: int = 4) -> SessionRegistry:
    return SessionRegistry(Metrics(CollectorRegistry()), max_sessions=max_sessions, idle_ttl_s=60, replica_id=name, handoff=store)


def handoffs(registry: SessionRegistry, direction: str, outcome: str) -> float:
    value = registry.metrics.registry.get_sample_value(
        "framewise_tracking_session_handoffs_total", {"direction": direction, "outcome": outcome}
    )
    return value or 0.0


def with_an_object(registry: SessionRegistry, key: str) -> None:
    session = registry.open(SamuraiConfig(kf_score_weight=0.15), key)
    bank = MemoryBank(session.config)
    bank.add_conditioning(0, np.full((1, 64, 4, 4), 0.5, np.float16), np.arange(256, dtype=np.float32))
    session.objects[7] = TrackedObject(7, CandidateSelector(session.config), bank)
    session.next_frame_index = 1
    registry.detach(session, keep=True)


async def test_the_client_key_is_the_session_id(store: SqliteJobStore) -> None:
    registry = replica(store, "replica-a")
    session = registry.open(SamuraiConfig(), "my-key-1")
    assert session.session_id == "my-key-1" and session.attached
    with pytest.raises(ServiceError) as taken:
        registry.open(SamuraiConfig(), "my-key-1")
    assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert len(registry.open(SamuraiConfig()).session_id) == 32  # no key: the server makes one


async def test_a_drained_session_resumes_once_on_another_replica(store: SqliteJobStore) -> None:
    a, b, c = replica(store, "replica-a"), replica(store, "replica-b"), replica(store, "replica-c")
    with_an_object(a, "key-drained")
    expected = dump_session(a.held("key-drained"))  # type: ignore[arg-type]

    await a.drain(timeout_s=5)
    assert len(a) == 0  # handed off, not kept
    with pytest.raises(ServiceError) as refused:
        a.open(SamuraiConfig(), "key-new")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in refused.value.message
    assert refused.value.retry_after_s is not None

    restored = await b.resume("key-drained")
    assert restored.attached and restored.next_frame_index == 1 and list(restored.objects) == [7]
    assert restored.config == SamuraiConfig(kf_score_weight=0.15)
    assert dump_session(restored) == expected  # the same state, byte for byte
    assert len(b) == 1
    assert handoffs(a, "out", "ok") == 1 and handoffs(b, "in", "ok") == 1

    # Taken: a third replica finds nothing, and says where to look.
    with pytest.raises(ServiceError) as missing:
        await c.resume("key-drained")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "is not held by replica 'replica-c'" in missing.value.message
    assert "x-framewise-session: 'key-drained'" in missing.value.message


async def test_the_not_found_message_stays_bounded(store: SqliteJobStore) -> None:
    with pytest.raises(ServiceError) as missing:
        await replica(store, "replica-a").resume("k" * 10_000)
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and len(missing.value.message) < 800


async def test_a_handed_off_session_is_not_restored_into_a_full_replica(store: SqliteJobStore) -> None:
    a, full = replica(store, "replica-a"), replica(store, "replica-full", max_sessions=1)
    with_an_object(a, "key-waiting")
    await a.drain(timeout_s=5)
    full.open(SamuraiConfig(), "key-busy")
    with pytest.raises(ServiceError) as exhausted:
        await full.resume("key-waiting")
    assert exhausted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The state is still in the store for a replica with room.
    assert (await replica(store, "replica-b").resume("key-waiting")).next_frame_index == 1


async def test_without_a_store_a_drain_releases_and_resume_is_not_found() -> None:
    alone = replica(None, "replica-alone")
    with_an_object(alone, "key-lost")
    await alone.drain(timeout_s=5)
    assert len(alone) == 0 and handoffs(alone, "out", "failed") == 1
    with pytest.raises(ServiceError) as refused:
        await alone.resume("key-lost")
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE  # draining: come back elsewhere


async def test_an_unreadable_handoff_is_left_for_a_replica_that_can_read_it(store: SqliteJobStore) -> None:
    await store.put_session_state("key-future", b"FWTRACK\0\x09\x00" + b"\0" * 32, ttl_s=60)
    with pytest.raises(ServiceError) as unreadable:
        await (old := replica(store, "replica-old")).resume("key-future")
    assert unreadable.value.code == grpc.StatusCode.FAILED_PRECONDITION and "version 9" in unreadable.value.message
    assert handoffs(old, "in", "failed") == 1
    assert await store.take_session_state("key-future") is not None  # put back, not lost
