"""Operation retention: finished operations are deleted (their row, events, artifact rows and
files) a while after they ended, so the job store does not grow for ever.

AIP-151 lets a service forget an operation some time after it finished; clients that need a
result longer download its artifacts, whose files follow their storage tier's own retention
(and go at the latest with their operation).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from server.aio import cancel_and_wait
from server.jobs.files.artifacts import delete_operation
from server.jobs.store import JobStore, JobStoreError, utcnow

__all__ = ["RETENTION_DUTY", "OperationRetention"]

log = logging.getLogger(__name__)


# The name of the one-per-cluster duty (JobStore.try_cluster_duty) this pass runs under.
RETENTION_DUTY = "operation-retention"


class OperationRetention:
    """Every ``interval_s``, deletes the operations that finished more than ``retention_s`` ago,
    on one replica of those sharing the store (the holder of its cluster duty), so N replicas do
    not race to delete the same operations and files."""

    def __init__(self, store: JobStore, *, retention_s: float, interval_s: float, batch: int = 500) -> None:
        if retention_s <= 0 or interval_s <= 0 or batch < 1:
            raise ValueError("retention_s and interval_s must be positive, batch >= 1")
        self.store = store
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, now: datetime | None = None) -> int | None:
        """A pass if this replica holds the retention duty (see purge_once); None when another
        replica does."""
        if not await self.store.try_cluster_duty(RETENTION_DUTY):
            return None
        return await self.purge_once(now)

    async def purge_once(self, now: datetime | None = None) -> int:
        """Deletes what is due now; returns how many operations went."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.retention_s)
        deleted = 0
        while names := await self.store.finished_before(cutoff, self.batch):
            for name in names:
                try:
                    await delete_operation(self.store, name)
                except JobStoreError:
                    continue  # deleted by a client meanwhile
                deleted += 1
            if len(names) < self.batch:
                break
        if deleted:
            log.info("operation retention: deleted finished operations", extra={"deleted": deleted, "ended_before": cutoff.isoformat()})
        return deleted

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="operation-retention")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:
                log.exception("operation retention pass failed")  # tried again next interval
            await asyncio.sleep(self.interval_s)

