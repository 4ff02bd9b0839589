"""A replica's registration and heartbeat in the job store (server/cluster/membership.py), what
GetServerInfo lists; on a real SQLite store (the PostgreSQL side of register_replica and
list_replicas is in the contract suite)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from server.cluster.membership import ReplicaMembership, advertised_address
from server.jobs.store.sqlite import SqliteJobStore


async def test_heartbeats_keep_a_replica_live_and_a_silent_one_goes_stale(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        a = ReplicaMembership(store, "replica-a", "127.0.0.1:1", interval_s=0.1)
        b = ReplicaMembership(store, "replica-b", "127.0.0.1:2", interval_s=0.1)
        await a.start()
        await b.start()
        first = {r.replica_id: r for r in await store.list_replicas()}
        await b.stop()  # b dies: no more heartbeats
        await asyncio.sleep(0.5)
        views = {v.record.replica_id: v for v in await a.replicas()}
        assert views["replica-a"].live and not views["replica-b"].live
        assert views["replica-a"].record.heartbeat_time > first["replica-a"].heartbeat_time
        assert views["replica-b"].record.heartbeat_time == first["replica-b"].heartbeat_time
        await a.stop()


async def test_without_heartbeat_it_registers_once_and_calls_itself_live(tmp_path: Path) -> None:
    async with SqliteJobStore(tmp_path / "jobs.db") as store:
        alone = ReplicaMembership(store, "replica-1", "127.0.0.1:1", interval_s=0.1, heartbeat=False)
        await alone.start()
        registered = (await store.list_replicas())[0]
        await asyncio.sleep(0.4)
        (view,) = await alone.replicas()
        assert view.live and view.record.heartbeat_time == registered.heartbeat_time
        await alone.stop()


@pytest.mark.parametrize(
    "listen, port, expected",
    [("127.0.0.1:0", 50061, "127.0.0.1:50061"), ("0.0.0.0:50051", 50051, f"{socket.gethostname()}:50051"),
     ("[::]:50051", 50051, f"{socket.gethostname()}:50051")],
)
def test_the_advertised_address_is_reachable_from_elsewhere(listen: str, port: int, expected: str) -> None:
    assert advertised_address(listen, port) == expected
