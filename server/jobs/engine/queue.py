"""The job queue: a view of the job store, which holds the one queue of every replica sharing it.
A fixed number of lanes (tasks) each claim the oldest waiting operation with a lease
(``store.claim_next``) and hand it to a ``JobExecution`` (server/jobs/engine/executor.py:
stages, retries, rollback), which runs there too (``--job-process inline``) or in the job worker
process (server/jobs/worker/).

Lifecycle of one operation::

    submit -> QUEUED (event: INITIALIZED 0 %) -> a lane of some replica claims it -> RUNNING
           -> stages, each checkpointed in the store (last_completed_stage)
           -> COMPLETED 100 % stage event + terminal "complete" event (SUCCEEDED, response)
        or -> terminal "error" event (FAILED, Operation.error), working files removed
        or -> terminal "complete" event (CANCELLED), working files removed

Leases. A claim gives the replica a lease of ``lease_s`` and a new epoch; the replica renews it
every ``renew_s`` (lease/3 by default: two renewals may fail before it lapses) and every write of
the job carries the epoch. A replica that dies (kill -9) or freezes stops renewing; once its
lease expired another replica's claim takes the job over (epoch + 1) and resumes it after its
last completed stage. The frozen replica, should it wake up, has every write refused
(LeaseLostError) and stops the job without writing anything more. A replica cut off from the
store for longer than the lease, whose job went on meanwhile, never claims that job a second
time (its lanes skip the jobs it runs): its renewer takes the lapsed lease back at the same
epoch, unless another replica claimed it first, and then the run stops as above.

Lanes wake on a local submit, on the store's notifications (another replica queued work, or
handed a lease back), and when a lane finishes a job (it claims again at once). The only timer,
``poll_s`` (lease/2), is for what nobody announces: a lease that expired because its replica
died.

Shutdown (SIGTERM drain) stops the lanes without touching the operations and hands their leases
back, so another replica (or this one's next start) resumes them at once rather than after the
lease expires: only CancelOperation cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.auth.principal import DEFAULT_TENANT
from server.errors import ServiceError
from server.jobs.engine.admission import Admission
from server.jobs.engine.events import EventBus
from server.jobs.engine.executor import JobExecution, JobExecutor, RetryPolicy, finish_cancelled
from server.jobs.engine.definition import JobDefinition
from server.jobs.files.storage import StorageManager
from server.jobs.store import (
    JobState,
    JobStoreUnavailableError,
    LeaseLostError,
    OperationNotFoundError,
    OperationRecord,
)

__all__ = ["DEFAULT_LEASE_S", "JobQueue", "QueueFull", "RetryPolicy", "default_replica_id"]

log = logging.getLogger("server.jobs")

# How long a claim holds a job without renewal: a killed replica's jobs resume elsewhere within
# about this (plus one poll). Renewal every third of it survives two lost renewals.
DEFAULT_LEASE_S = 15.0


def default_replica_id() -> str:
    """Host name and PID: unique per process on a host, and says where to look."""
    return f"{socket.gethostname()}-{os.getpid()}"


class QueueFull(ServiceError):
    # ServiceError is a dataclass: its generated __init__ sets ``code`` on the instance (default
    # INTERNAL), which shadowed a class attribute here, so the client got INTERNAL. Pass it in.
    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class _Lease:
    """A job this replica holds."""

    name: str
    epoch: int
    job: asyncio.Future[None] | None = None
    lost: bool = False
    cancelling: asyncio.Task[None] | None = None
    renewer: asyncio.Task[None] | None = field(default=None, repr=False)


class JobQueue:
    def __init__(
        self,
        bus: EventBus,
        storage: StorageManager,
        admission: Admission,
        definitions: Mapping[int, JobDefinition],
        *,
        concurrency: int = 4,
        max_queued: int = 64,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        execution: JobExecution | None = None,
        replica_id: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        renew_s: float | None = None,
        poll_s: float | None = None,
        store_retry_s: float = 1.0,
    ) -> None:
        """``concurrency``: lanes, so jobs this replica runs at once. ``max_queued``: jobs
        waiting in the whole cluster (the store's count). ``execution`` runs what the lanes
        claim; by default a JobExecutor on this event loop (built from bus, storage, admission,
        definitions, retry and rng). ``replica_id`` names this replica in leases (default: host
        name and PID); ``renew_s`` defaults to lease/3, ``poll_s`` to lease/2; ``store_retry_s``:
        how long lanes pause while the store is unreachable."""
        if concurrency < 1 or max_queued < 1:
            raise ValueError("concurrency and max_queued must be >= 1")
        renew_s = lease_s / 3 if renew_s is None else renew_s
        if not 0 < renew_s < lease_s:
            raise ValueError(f"the lease renewal interval must be > 0 and shorter than the lease ({lease_s} s), got {renew_s}")
        self.bus = bus
        self.store = bus.store
        self.storage = storage
        self.admission = admission
        self.definitions = dict(definitions)
        self.concurrency = concurrency
        self.max_queued = max_queued
        self.replica_id = replica_id or default_replica_id()
        self.lease_s = lease_s
        self.renew_s = renew_s
        self.poll_s = lease_s / 2 if poll_s is None else poll_s
        self.store_retry_s = store_retry_s
        self.execution = execution or JobExecutor(
            bus, storage, admission, definitions, retry=retry or RetryPolicy(), rng=rng
        )
        # Submits check the cluster's count and create their operation under this lock, so
        # this replica's concurrent submits cannot push the queue past max_queued together.
        self._admit = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._running: dict[str, _Lease] = {}
        self._claims: set[asyncio.Future[OperationRecord | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        # Leases of jobs stopped while the store was unreachable, handed back once it answers.
        self._to_release: list[_Lease] = []
        self._unlisten: object = None

    # ------------------------------------------------------------------ public surface

    def definition(self, kind: int) -> JobDefinition:
        return self.definitions[kind]

    @property
    def running(self) -> list[str]:
        """The operations this replica holds a lease on."""
        return list(self._running)

    async def queue_position(self, name: str) -> int:
        """0 = next to be claimed in the cluster; -1 when not waiting (running, finished,
        unknown)."""
        return await self.store.waiting_position(name)

    async def submit(
        self, kind: int, request: Message, request_id: str = "", *, tenant: str = DEFAULT_TENANT
    ) -> OperationRecord:
        """Validates, stores (so queues) a job of ``tenant``; a repeated request_id of the same
        tenant returns the first operation (request ids are per tenant)."""
        definition = self.definitions[kind]
        # Checked before validation too: a full queue answers at once, without probing a video
        # or reading an upload first.
        if await self.store.count_waiting() >= self.max_queued:
            return await self._answer_full(kind, request_id, tenant)
        await definition.validate(request)
        # Shielded: once the row may be committed (the store finishes its write even if this
        # call is cancelled), its "queued" event must be written too and the lanes woken.
        return await asyncio.shield(asyncio.ensure_future(self._store(kind, request, request_id, tenant)))

    async def _answer_full(self, kind: int, request_id: str, tenant: str) -> OperationRecord:
        # A repeat of a submission that exists is answered with it, full queue or not: the
        # client is retrying a call whose answer it lost, and its job is already in line.
        existing = await self.store.find_request(request_id, kind, tenant=tenant) if request_id else None
        if existing is not None:
            return existing
        raise QueueFull(f"the job queue is full ({self.max_queued} jobs waiting); retry later or raise --max-queued-jobs")

    async def _store(self, kind: int, request: Message, request_id: str, tenant: str) -> OperationRecord:
        async with self._admit:
            # The count is the cluster's (every replica's waiting jobs). Two replicas admitting
            # at the same instant may each see the last free place: the bound can be passed by
            # at most one job per other replica, never by this replica's own submits.
            position = await self.store.count_waiting()
            if position >= self.max_queued:
                return await self._answer_full(kind, request_id, tenant)
            op, created = await self.store.create_operation(
                kind=kind,
                request=request.SerializeToString(),
                request_id=request_id or None,
                stage=jobs_pb2.JOB_STAGE_INITIALIZED,
                message="queued",
                tenant=tenant,
            )
        if not created:
            return op
        payload = jobs_pb2.StageUpdate(
            stage=jobs_pb2.JOB_STAGE_INITIALIZED, percent=0.0, message=f"queued (position {position})"
        )
        # Fenced at epoch 0 (unclaimed): a lane that claimed the job before this write (the store
        # announces new work to every replica as it commits) has written this first event itself.
        with contextlib.suppress(LeaseLostError):
            await self.bus.emit(op.name, "stage_update", payload.SerializeToString(), epoch=op.lease_epoch)
        self.wake()
        log.info("job queued", extra={"operation": op.name, "kind": jobs_pb2.JobKind.Name(kind), "position": position})
        return await self.store.get_operation(op.name)

    async def cancel(self, name: str) -> OperationRecord:
        """Requests cancellation, wherever the job is: held here, it is stopped (model slots
        freed, D-ID polling stopped) and ends CANCELLED before this returns; held by nobody
        (queued, or handed back), it ends CANCELLED in the store at once; held by another
        replica, that replica sees the flag at its next lease renewal (or sooner, through the
        store's cancel notification) and cancels it, and a dead replica's job is cancelled by
        whichever replica claims it next."""
        op = await self.store.request_cancel(name)
        if op.done:
            return op
        lease = self._running.get(name)
        if lease is not None:
            await self._cancel_held(lease)
        elif op.lease_owner is None:
            # Fenced by the epoch read with the flag: a claim landing in between moves it on, and
            # its claimer, which sees the flag, cancels the job instead of this write.
            with contextlib.suppress(LeaseLostError):
                await finish_cancelled(self.bus, self.storage, op, None, epoch=op.lease_epoch)
        else:
            # Held by another replica: wait (bounded) for its CANCELLED event, so the caller
            # usually gets the final state as from a local cancel. A dead holder's job ends once
            # another replica claims it, after this returns.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_s + 2.0), self.bus.subscribe(name, op.last_sequence) as events:
                    async for item in events:
                        if item.terminal:
                            break
        return await self.store.get_operation(name)

    def wake(self) -> None:
        """Idle lanes look for work now (a submit here, or a notification from another replica)."""
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    async def start(self) -> None:
        """Frees the leases a previous process of this replica left (single-replica store), then
        starts the lanes, which claim whatever is waiting, resumed jobs first (creation order)."""
        if not getattr(self.store, "shared_by_replicas", True):
            for op in await self.store.unfinished_operations():
                if op.lease_owner is not None:
                    await self.store.release_lease(op.name, op.lease_owner, op.lease_epoch)
                if op.cancel_requested:
                    # Requested before the restart: it ends now (a lane would do the same on claim).
                    await finish_cancelled(self.bus, self.storage, op, None, epoch=op.lease_epoch)
                elif op.state == JobState.RUNNING:
                    log.info(
                        "resuming job after restart",
                        extra={"operation": op.name, "last_completed_stage": op.last_completed_stage},
                    )
                    # It waits for a lane again: say so (a lane moves it back to RUNNING).
                    await self.store.update_operation(op.name, state=JobState.QUEUED, message="queued again after a restart")
        listen = getattr(self.store, "listen", None)
        if listen is not None:
            self._unlisten = listen(self._on_notification)
        await self.execution.start()
        self._tasks = [asyncio.create_task(self._lane(), name=f"job-lane-{i}") for i in range(self.concurrency)]

    async def stop(self) -> None:
        """Stops the lanes and the jobs they run (they stay RUNNING in the store) and hands
        their leases back, so another replica resumes them at once."""
        if callable(self._unlisten):
            self._unlisten()
            self._unlisten = None
        held = list(self._running.values())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.execution.stop()
        # Claims that were in flight when the lanes stopped: hand those back too.
        for claim in list(self._claims):
            with contextlib.suppress(Exception):
                op = await claim
                if op is not None:
                    held.append(_Lease(op.name, op.lease_epoch))
        for lease in held:
            if lease.lost:
                continue
            try:
                await self.store.release_lease(lease.name, self.replica_id, lease.epoch)
            except Exception as exc:  # noqa: BLE001 - the lease then expires on its own
                log.warning("could not hand a job's lease back", extra={"operation": lease.name, "error": str(exc)})
            else:
                log.info("handed a job back", extra={"operation": lease.name, "replica": self.replica_id})

    # ------------------------------------------------------------------ lanes

    async def _lane(self) -> None:
        while True:
            wakeup = self._wakeup  # taken before the claim: a wake-up during it is not lost
            while self._to_release:
                lease = self._to_release.pop()
                await self._hand_back_unfinished(lease)
            # Jobs still running here are never claimed again, even when their lease lapsed
            # (a store outage longer than the lease): their renewer takes the lease back, and a
            # second run of one job under a new epoch beside the first is never started.
            claim = asyncio.ensure_future(self.store.claim_next(self.replica_id, self.lease_s, skip=tuple(self._running)))
            self._claims.add(claim)
            try:
                op = await asyncio.shield(claim)
            except asyncio.CancelledError:
                raise  # stop() hands back what the claim got
            except JobStoreUnavailableError:
                # The store is down: pause, then try again; lanes resume by themselves.
                await asyncio.sleep(self.store_retry_s)
                continue
            except Exception:
                log.exception("claiming a job failed")
                await asyncio.sleep(self.store_retry_s)
                continue
            finally:
                if claim.done():
                    self._claims.discard(claim)
            if op is None:
                # The timer is for what no notification announces: a lease that expired
                # because its replica died (or a store that cannot notify).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), self.poll_s)
                continue
            await self._run_claimed(op)

    async def _run_claimed(self, op: OperationRecord) -> None:
        name = op.name
        lease = _Lease(name, op.lease_epoch)
        self._running[name] = lease
        if op.lease_epoch > 1:
            log.info(
                "claimed a job another run left unfinished; resuming it",
                extra={"operation": name, "epoch": op.lease_epoch, "last_completed_stage": op.last_completed_stage},
            )
        try:
            if op.cancel_requested:
                await finish_cancelled(self.bus, self.storage, op, None, epoch=op.lease_epoch)
                return
            lease.job = asyncio.ensure_future(self.execution.run(name, op.lease_epoch))
            lease.renewer = asyncio.create_task(self._renew(lease), name=f"lease {name}")
            try:
                await lease.job
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not lease.lost or (current is not None and current.cancelling()):
                    raise  # the lane is stopping
            if lease.cancelling is not None:
                await asyncio.wait([lease.cancelling])
        except asyncio.CancelledError:
            raise
        except (LeaseLostError, JobStoreUnavailableError):
            pass  # logged where raised; below, the lease goes back where it is still ours
        except Exception:  # a bug in one job must not stop the lane
            log.exception("job execution failed", extra={"operation": name})
        finally:
            if lease.renewer is not None:
                lease.renewer.cancel()
            self._running.pop(name, None)
        if not lease.lost:
            await self._hand_back_unfinished(lease)

    async def _hand_back_unfinished(self, lease: _Lease) -> None:
        """A run that ended with its operation unfinished (the store was unreachable meanwhile)
        hands the lease back, so the job resumes at the next claim instead of after expiry."""
        try:
            op = await self.store.get_operation(lease.name)
            if not op.done:
                await self.store.release_lease(lease.name, self.replica_id, lease.epoch)
                self.wake()
        except OperationNotFoundError:
            pass
        except JobStoreUnavailableError:
            # Handed back by a lane once the store answers again (or it expires meanwhile).
            self._to_release.append(lease)
            await asyncio.sleep(self.store_retry_s)
        except Exception:
            log.exception("handing a job's lease back failed", extra={"operation": lease.name})

    async def _renew(self, lease: _Lease) -> None:
        """Renews the lease every renew_s while the job runs; learns of cancel requests from
        other replicas on the way; stops the job once the lease is lost."""
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                op = await self.store.renew_lease(lease.name, self.replica_id, lease.epoch, self.lease_s)
            except LeaseLostError as exc:
                if exc.current_epoch == lease.epoch:
                    return  # the job finished (its terminal write ended the lease): nothing to stop
                lease.lost = True
                log.warning(
                    "lease lost: another replica took the job over; stopping it without further writes",
                    extra={"operation": lease.name, "epoch": lease.epoch, "owner": exc.owner, "current_epoch": exc.current_epoch},
                )
                if lease.job is not None:
                    lease.job.cancel()
                return
            except (JobStoreUnavailableError, OperationNotFoundError):
                continue  # tried again next period; a lease that lapses meanwhile is lost then
            except Exception:
                log.exception("renewing a job's lease failed", extra={"operation": lease.name})
                continue
            if op.cancel_requested:
                self._start_cancel(lease)

    def _start_cancel(self, lease: _Lease) -> asyncio.Task[None]:
        if lease.cancelling is None:
            lease.cancelling = asyncio.create_task(self.execution.cancel(lease.name), name=f"cancel {lease.name}")
        return lease.cancelling

    async def _cancel_held(self, lease: _Lease) -> None:
        # asyncio.wait, not await: a CancelOperation call cancelled by its client must not
        # cancel the cancellation while it writes the CANCELLED event.
        await asyncio.wait([self._start_cancel(lease)])
        if lease.job is not None:
            # A cancel that reached the job before its task had started finds nothing to stop:
            # the job then sees the stored flag as it starts and ends CANCELLED itself.
            await asyncio.wait([lease.job])

    def _on_notification(self, notification: object) -> None:
        """The store's wake-ups (server.jobs.store.notifications): work queued or handed back
        anywhere, a cancel requested anywhere, or "re-read" after listening (re)started."""
        kind = str(getattr(notification, "kind", ""))
        name = getattr(notification, "operation", "")
        if kind in ("queued", "released", "resync"):
            self.wake()
        elif kind == "cancel":
            lease = self._running.get(name)
            if lease is not None:
                self._start_cancel(lease)
