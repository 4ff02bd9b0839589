"""The job worker's side of the channel to the serving process: the store and the event sink
its jobs use, both answered by the serving process.

The serving process owns the job store: it commits every write, events included, and
publishes each event the moment it is committed. The worker runs at a lower CPU priority, so
it must never hold what the serving process waits on: had it written to the SQLite file
itself, a worker descheduled inside its write transaction would stall the serving process's
next append (and every watch stream behind it) on the file lock, and its events would wait
for a core before reaching the EventBus.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from server.jobs.store import ArtifactRecord, EventRecord, OperationRecord, OperationUpdate
from server.jobs.worker.ipc import write_message

__all__ = ["FrontChannel", "RemoteEventSink", "RemoteStore"]


class FrontChannel:
    """Calls into the serving process: one ("call", id, method, args, kwargs) frame out, one
    ("reply", id, ok, value) frame back; an error raised there is raised here."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            write_message(self._writer, "call", call_id, method, args, kwargs)
            return await future
        finally:
            self._pending.pop(call_id, None)

    def resolve(self, call_id: int, ok: bool, value: Any) -> None:
        future = self._pending.get(call_id)
        if future is None or future.done():
            return  # its caller was cancelled
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class RemoteStore:
    """The part of JobStore that running jobs use."""

    def __init__(self, channel: FrontChannel) -> None:
        self._channel = channel

    async def get_operation(self, name: str) -> OperationRecord:
        return await self._channel.call("get_operation", name)

    async def get_request(self, name: str) -> bytes:
        return await self._channel.call("get_request", name)

    async def update_operation(
        self, name: str, update: OperationUpdate | None = None, /, **fields: object
    ) -> OperationRecord:
        return await self._channel.call("update_operation", name, update, **fields)

    async def add_artifact(self, artifact: ArtifactRecord, *, epoch: int | None = None) -> ArtifactRecord:
        return await self._channel.call("add_artifact", artifact, epoch=epoch)

    async def list_artifacts(self, name: str) -> list[ArtifactRecord]:
        return await self._channel.call("list_artifacts", name)


class RemoteEventSink:
    """The worker's EventSink: the serving process stores the event, then publishes it."""

    def __init__(self, channel: FrontChannel) -> None:
        self._channel = channel
        self.store = RemoteStore(channel)

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
        # epoch crosses as a keyword: the serving process's EventBus.emit passes it to the store.
        return await self._channel.call(
            "emit", name, event_type, payload, terminal=terminal, update=update, epoch=epoch
        )
