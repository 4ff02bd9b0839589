"""Which replicas the cluster has: each replica registers itself in the shared job store and
renews that registration (a heartbeat); ``framewise info`` lists them.

Nothing routes by this list (the load balancer has its own health checks): it tells people
which replicas exist, which one answered, and which stopped renewing (killed, frozen, cut
off from the store). A replica that stopped is listed as not live after ``3 * interval_s``
and left out after ``forget_after_s``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from server.aio import cancel_and_wait
from server.jobs.store import JobStore, JobStoreError, ReplicaRecord

__all__ = ["ReplicaMembership", "ReplicaView", "advertised_address"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
FORGET_AFTER_S = 3600.0


def advertised_address(listen: str, port: int) -> str:
    """The address other machines reach this replica at: ``listen`` with the port it got, or the
    host name when it listens on every interface (0.0.0.0 / [::] mean nothing elsewhere)."""
    host = listen.rpartition(":")[0].strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"{host}:{port}"


@dataclass(frozen=True)
class ReplicaView:
    record: ReplicaRecord
    live: bool


class ReplicaMembership:
    """Registers ``replica_id`` at ``address`` in ``store`` now and every ``interval_s``."""

    def __init__(
        self,
        store: JobStore,
        replica_id: str,
        address: str,
        *,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        forget_after_s: float = FORGET_AFTER_S,
        heartbeat: bool = True,
    ) -> None:
        """``heartbeat=False``: register once and never renew; for a store no other replica
        reads (SQLite: one replica), where a write every few seconds would only cost a commit
        (an fsync) on the thread that commits the jobs' events."""
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.store = store
        self.replica_id = replica_id
        self.address = address
        self.interval_s = interval_s
        self.forget_after_s = forget_after_s
        self.heartbeat = heartbeat
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._beat()
        if self.heartbeat:
            self._task = asyncio.create_task(self._run(), name="replica-heartbeat")

    async def _beat(self) -> None:
        try:
            await self.store.register_replica(self.replica_id, self.address)
        except JobStoreError as exc:  # the store is down: the jobs' health says so; try again later
            log.debug("replica heartbeat failed", extra={"error": str(exc)})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._beat()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def replicas(self) -> list[ReplicaView]:
        """The replicas seen within ``forget_after_s``, by id; live: a heartbeat within three
        intervals (the store's clock decides both); this replica, which is answering, is live
        whatever its row says. Raises JobStoreError when the store is down."""
        known = await self.store.list_replicas(seen_within_s=self.forget_after_s)
        live = {r.replica_id for r in await self.store.list_replicas(seen_within_s=3 * self.interval_s)}
        return [ReplicaView(r, r.replica_id in live or r.replica_id == self.replica_id) for r in known]
