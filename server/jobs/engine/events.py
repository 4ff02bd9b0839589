"""In-process fan-out of stored job events to watchers (the WatchOperation stream).

Contract with the job executor: an event is appended to the store (committed, durable) first and
published second, so everything a watcher ever sees can be replayed after a restart::

    record = await store.append_event(name, "progress_update", msg.SerializeToString())
    await bus.publish(record)

or, the same in one call, ``await bus.emit(name, "progress_update", payload)``.

A watcher iterates ``bus.subscribe(name, after_sequence)``; it yields ``EventRecord`` objects
(sequence after_sequence+1, +2, ... with no gap and no duplicate), ``Heartbeat`` objects while
nothing happens, and ends after the terminal event (or at once if the operation has already
finished and nothing is left after ``after_sequence``).

How "no gap, no duplicate" holds:

* ``subscribe`` registers the subscriber's queue *before* anything is read from the store, so
  an event committed while the history is being replayed is either in the replayed rows or in
  the queue (or both); a cursor (the last sequence delivered) drops the duplicates.
* A live event whose sequence is not cursor+1 (concurrent appenders may publish out of order)
  triggers a re-read from the store, which has every committed event.
* The per-subscriber queue is bounded; when a slow watcher lets it fill, the publisher never
  waits: it discards that watcher's queue and marks it "overflowed", and the watcher re-reads
  from the store from its cursor. No event is dropped, and memory stays bounded.

Other replicas (a shared PostgreSQL store): an event emitted by replica S reaches watchers on
replica R through the store, never through S. S's append_event sends ``pg_notify`` in the same
transaction as the INSERT (so the notification exists only once the event is committed, in
commit order); R's store has one LISTEN connection and hands each notification
(operation, sequence) to ``_on_notification``. If a watcher here lacks that sequence, one task
per operation reads ``events_after(name, least advanced watcher's position)`` and offers the
records to every watcher of the operation, through the same queues and the same cursor checks
as local events: the store is the only source, the notification only says when to read. A
notification of an event this bus emitted itself is dropped without a read (every watcher has
it, or will have it when the emit in flight publishes). When the LISTEN connection is
(re)established (PostgreSQL restarted) the store sends RESYNC, and every watched operation is
re-read from its watchers' positions: a notification missed while disconnected costs a read,
never an event. If such a read fails, each watcher re-reads by itself, so the failure reaches
its stream (UNAVAILABLE) and the client resumes with ``after_sequence``. No polling: between
notifications nothing is read; heartbeats are timers, as for local watchers.

This is single-event-loop code; ``publish`` must be called on the loop the subscribers run on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Self

from server.jobs.store import (
    EventRecord,
    JobStore,
    JobStoreUnavailableError,
    OperationRecord,
    OperationUpdate,
    utcnow,
)
from server.jobs.store.notifications import Notification, NotificationKind

__all__ = ["EventBus", "Heartbeat", "Subscription", "WatchItem"]

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_QUEUE_SIZE = 256
DEFAULT_REPLAY_BATCH = 500
# How long a notified read waits for an unavailable store before the watchers get the error.
UNAVAILABLE_RETRY_S = 5.0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent while idle; never stored. ``sequence`` is the last real event's sequence delivered
    to this watcher (0 if none), as ``WatchOperationResponse.sequence`` of a heartbeat."""

    operation: str
    sequence: int
    time: datetime
    event_type: ClassVar[str] = "heartbeat"
    terminal: ClassVar[bool] = False


WatchItem = EventRecord | Heartbeat


class _Subscriber:
    """One watcher's queue and how to wake it. A watcher waiting for an event parks on a bare
    future; the heartbeat is one timer per idle period (see Subscription._next_wait), not a
    timeout armed and cancelled around every wait: with 100 watchers per operation, that timer
    churn was a measurable part of every event's fan-out."""

    __slots__ = ("closed", "known", "maxsize", "overflowed", "pending", "waiter")

    def __init__(self, maxsize: int, known: int) -> None:
        self.maxsize = maxsize
        self.pending: collections.deque[EventRecord] = collections.deque()
        self.overflowed = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        # The highest sequence this watcher has been given or has read itself: a notification
        # of an event at or below it needs no read from the store.
        self.known = known

    def reread(self) -> None:
        """Makes the watcher re-read the store from its cursor (as after an overflow)."""
        self.pending.clear()
        self.overflowed = True
        self.wake()

    def offer(self, record: EventRecord) -> None:
        if record.sequence > self.known:
            self.known = record.sequence
        if self.overflowed:
            pass  # the watcher re-reads the store anyway
        elif len(self.pending) >= self.maxsize:
            self.pending.clear()
            self.overflowed = True
        else:
            self.pending.append(record)
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Subscription:
    """Async iterator over one watcher's events; see the module docstring. Registered with the
    bus when created. Close it with ``await sub.aclose()`` or ``async with`` if you stop
    iterating before it ends."""

    def __init__(
        self,
        bus: EventBus,
        name: str,
        after_sequence: int,
        heartbeat_s: float,
        queue_size: int,
    ) -> None:
        if after_sequence < 0:
            raise ValueError("after_sequence must be >= 0")
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        self.name = name
        self.cursor = after_sequence  # last sequence delivered
        self.heartbeat_s = heartbeat_s
        self.finished = False
        self._bus = bus
        self._sub = _Subscriber(queue_size, after_sequence)
        self._timer: asyncio.TimerHandle | None = None
        self._quiet_until = 0.0
        bus._add(name, self._sub)
        self._gen = self._run()

    def __aiter__(self) -> AsyncIterator[WatchItem]:
        # The generator itself: ``async for`` then resumes it directly, without a method call
        # per item in between (one of the per-watcher costs of every fan-out).
        return self._gen

    async def __anext__(self) -> WatchItem:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        self._bus._remove(self.name, self._sub)
        await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # attributes may be gone at shutdown
            self._bus._remove(self.name, self._sub)

    async def _from_store(self) -> AsyncIterator[EventRecord]:
        """Every stored event after the cursor, batch by batch, stopping at a terminal one."""
        batch_size = self._bus.replay_batch
        while True:
            batch = await self._bus.store.events_after(self.name, self.cursor, batch_size)
            for record in batch:
                if record.sequence <= self.cursor:
                    continue
                self._advance(record)
                yield record
                if self.finished:
                    return
            if len(batch) < batch_size:
                return

    def _advance(self, record: EventRecord) -> None:
        """The record is the next one delivered: move the cursor; a terminal event ends the stream."""
        self.cursor = record.sequence
        if record.sequence > self._sub.known:
            self._sub.known = record.sequence
        self._quiet_until = asyncio.get_running_loop().time() + self.heartbeat_s
        if record.terminal:
            self.finished = True

    async def _run(self) -> AsyncIterator[WatchItem]:
        store = self._bus.store
        sub = self._sub
        loop = asyncio.get_running_loop()
        # No heartbeat before this loop time: heartbeat_s after the last item delivered.
        self._quiet_until = loop.time() + self.heartbeat_s
        try:
            await store.get_operation(self.name)  # OperationNotFoundError for an unknown name
            async for record in self._from_store():
                yield record
            if self.finished:
                return
            # Finished operation with nothing (terminal) left after the cursor: end now rather
            # than heartbeat forever. Re-read first in case events landed since the replay.
            op: OperationRecord = await store.get_operation(self.name)
            if op.state.is_terminal:
                async for record in self._from_store():
                    yield record
                return
            while not sub.closed:
                if sub.overflowed:
                    sub.overflowed = False
                    sub.pending.clear()
                    async for record in self._from_store():
                        yield record
                    if self.finished:
                        return
                    continue
                if sub.pending:
                    record = sub.pending.popleft()
                    if record.sequence <= self.cursor:
                        continue  # already delivered (replay/live overlap)
                    if record.sequence == self.cursor + 1:
                        self._advance(record)
                        yield record
                        if self.finished:
                            return
                        continue
                    # Gap: an earlier event is committed but not yet published to us (or was
                    # published out of order). The store has it.
                    async for stored in self._from_store():
                        yield stored
                    if self.finished:
                        return
                    continue
                if loop.time() >= self._quiet_until:
                    yield Heartbeat(self.name, self.cursor, utcnow())
                    self._quiet_until = loop.time() + self.heartbeat_s
                    continue
                await self._wait(loop)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._bus._remove(self.name, sub)

    async def _wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until an event is offered or the heartbeat is due. The heartbeat timer is armed once
        per idle period: delivering an event only moves ``_quiet_until``; a timer that fires
        before it wakes the watcher, which finds nothing to do and arms the timer again."""
        sub = self._sub
        if self._timer is None or self._timer.when() > self._quiet_until or self._timer.cancelled():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(self._quiet_until, self._heartbeat_due)
        sub.waiter = loop.create_future()
        try:
            await sub.waiter
        finally:
            sub.waiter = None

    def _heartbeat_due(self) -> None:
        self._timer = None
        self._sub.wake()


class EventBus:
    """Fan-out of committed events to any number of watchers per operation."""

    def __init__(
        self,
        store: JobStore,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        replay_batch: int = DEFAULT_REPLAY_BATCH,
    ) -> None:
        if queue_size < 1 or replay_batch < 1:
            raise ValueError("queue_size and replay_batch must be >= 1")
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.queue_size = queue_size
        self.replay_batch = replay_batch
        self._subs: dict[str, set[_Subscriber]] = {}
        # Cross-replica delivery (see "Other replicas" in the module docstring).
        self._unlisten: Callable[[], None] | None = None
        self._emitting: dict[str, int] = {}  # this bus's emits in flight, per operation
        self._wanted: dict[str, int] = {}  # highest sequence notified and not yet read, per operation
        self._resync: set[str] = set()  # operations to re-read in full (notifications were missed)
        self._catching_up: dict[str, asyncio.Task[None]] = {}

    def subscribe(
        self,
        name: str,
        after_sequence: int = 0,
        *,
        heartbeat_s: float | None = None,
    ) -> Subscription:
        """Registers a watcher now and returns its iterator (history, then live events)."""
        return Subscription(
            self,
            name,
            after_sequence,
            self.heartbeat_s if heartbeat_s is None else heartbeat_s,
            self.queue_size,
        )

    async def publish(self, record: EventRecord) -> None:
        """Hands a committed event to every watcher of its operation. Never waits on a
        watcher."""
        for sub in tuple(self._subs.get(record.operation, ())):
            sub.offer(record)

    async def emit(
        self,
        name: str,
        event_type: str,
        payload: bytes,
        *,
        terminal: bool | None = None,
        update: OperationUpdate | None = None,
        epoch: int | None = None,
    ) -> EventRecord:
        """``store.append_event`` (durable) then ``publish``. ``epoch``: the caller's lease
        epoch; the store refuses the event (LeaseLostError, nothing stored or published) once
        another replica's claim moved the operation's epoch on."""
        # While this emit is in flight, the store's notification of this very event may arrive
        # before append_event returns: counting emits in flight lets _on_notification wait for
        # the publish below instead of reading the store for an event it is about to hand over.
        self._emitting[name] = self._emitting.get(name, 0) + 1
        try:
            record = await self.store.append_event(
                name, event_type, payload, terminal=terminal, update=update, epoch=epoch
            )
            await self.publish(record)
        finally:
            left = self._emitting[name] - 1
            if left:
                self._emitting[name] = left
            else:
                del self._emitting[name]
                if name in self._wanted or name in self._resync:
                    self._maybe_catch_up(name)
        return record

    def subscriber_count(self, name: str | None = None) -> int:
        if name is not None:
            return len(self._subs.get(name, ()))
        return sum(len(s) for s in self._subs.values())

    def close(self) -> None:
        """Ends every subscription (each iterator stops after what it has in hand)."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for task in self._catching_up.values():
            task.cancel()
        self._catching_up.clear()
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub.wake()
        self._subs.clear()

    def _add(self, name: str, sub: _Subscriber) -> None:
        if self._unlisten is None:
            # Listening starts with the first watcher (on the loop; the store's first RESYNC
            # then covers anything committed before the LISTEN took effect).
            self._unlisten = self.store.listen(self._on_notification)
        self._subs.setdefault(name, set()).add(sub)

    # -- other replicas' events -------------------------------------------------------------------

    def _on_notification(self, notification: Notification) -> None:
        kind = notification.kind
        if kind == NotificationKind.EVENT:
            name = notification.operation
            subs = self._subs.get(name)
            if not subs or notification.sequence <= min(sub.known for sub in subs):
                return  # nobody watches it here, or every watcher has it (this bus emitted it)
            if notification.sequence > self._wanted.get(name, 0):
                self._wanted[name] = notification.sequence
            if name not in self._emitting:
                self._maybe_catch_up(name)
        elif kind == NotificationKind.RESYNC:
            for name in self._subs:
                self._resync.add(name)
                if name not in self._emitting:
                    self._maybe_catch_up(name)

    def _maybe_catch_up(self, name: str) -> None:
        """Starts the one reader of ``name``'s missing events unless it runs already (it loops
        until nothing is wanted) or nothing is missing."""
        if name in self._catching_up:
            return
        subs = self._subs.get(name)
        if not subs:
            self._wanted.pop(name, None)
            self._resync.discard(name)
            return
        if name not in self._resync and self._wanted.get(name, 0) <= min(sub.known for sub in subs):
            self._wanted.pop(name, None)
            return
        self._catching_up[name] = asyncio.get_running_loop().create_task(
            self._catch_up(name), name=f"event-catch-up {name}"
        )

    async def _read_notified(self, name: str, start: int) -> list[EventRecord]:
        """``events_after``, retried while the store says it is unavailable for up to
        ``UNAVAILABLE_RETRY_S``: after a PostgreSQL restart the LISTEN connection (and its RESYNC)
        may be back a moment before the store's pool is, and watchers should not see an error
        for that moment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UNAVAILABLE_RETRY_S
        while True:
            try:
                return await self.store.events_after(name, start, self.replay_batch)
            except JobStoreUnavailableError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    async def _catch_up(self, name: str) -> None:
        """One store read per notified operation, whatever its number of watchers here: from the
        least advanced watcher's position to the end, offered to all of them (each one drops what
        it has; one that finds a gap re-reads by itself)."""
        try:
            while True:
                subs = self._subs.get(name)
                if not subs:
                    return
                start = min(sub.known for sub in subs)
                full = name in self._resync
                self._resync.discard(name)
                wanted = self._wanted.pop(name, 0)
                if not full and wanted <= start:
                    return
                # To the end of what is committed now: notifications that arrive meanwhile set
                # _wanted / _resync again, and the next turn of the loop looks at them.
                while True:
                    batch = await self._read_notified(name, start)
                    for record in batch:
                        for sub in tuple(self._subs.get(name, ())):
                            if record.sequence > sub.known:
                                sub.offer(record)
                    if len(batch) < self.replay_batch:
                        break
                    start = batch[-1].sequence
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store failed (e.g. PostgreSQL restarting): each watcher re-reads by itself,
            # so the error reaches its stream (UNAVAILABLE) and the client resumes by sequence.
            log.warning("reading notified events failed; watchers re-read", exc_info=True, extra={"operation": name})
            for sub in tuple(self._subs.get(name, ())):
                sub.reread()
        finally:
            self._catching_up.pop(name, None)

    def _remove(self, name: str, sub: _Subscriber) -> None:
        subs = self._subs.get(name)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[name]
                self._wanted.pop(name, None)
                self._resync.discard(name)
