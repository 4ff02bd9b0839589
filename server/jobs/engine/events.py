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

This is single-event-loop code; ``publish`` must be called on the loop the subscribers run on.
A multi-process deployment replaces it with a Redis-backed bus with the same surface.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Self

from server.jobs.store import (
    EventRecord,
    JobStore,
    OperationRecord,
    OperationUpdate,
    utcnow,
)

__all__ = ["EventBus", "Heartbeat", "Subscription", "WatchItem"]

DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_QUEUE_SIZE = 256
DEFAULT_REPLAY_BATCH = 500


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

    __slots__ = ("closed", "maxsize", "overflowed", "pending", "waiter")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.pending: collections.deque[EventRecord] = collections.deque()
        self.overflowed = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None

    def offer(self, record: EventRecord) -> None:
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
        self._sub = _Subscriber(queue_size)
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
    ) -> EventRecord:
        """``store.append_event`` (durable) then ``publish``."""
        record = await self.store.append_event(name, event_type, payload, terminal=terminal, update=update)
        await self.publish(record)
        return record

    def subscriber_count(self, name: str | None = None) -> int:
        if name is not None:
            return len(self._subs.get(name, ()))
        return sum(len(s) for s in self._subs.values())

    def close(self) -> None:
        """Ends every subscription (each iterator stops after what it has in hand)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.closed = True
                sub.wake()
        self._subs.clear()

    def _add(self, name: str, sub: _Subscriber) -> None:
        self._subs.setdefault(name, set()).add(sub)

    def _remove(self, name: str, sub: _Subscriber) -> None:
        subs = self._subs.get(name)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[name]
