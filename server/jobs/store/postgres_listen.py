"""One LISTEN connection per PostgresJobStore (per replica), feeding the store's notification
listeners.

The connection is a plain autocommit connection outside the pool (a pooled one would be
handed to queries). It LISTENs on both channels, then delivers a RESYNC (anything sent before
the LISTEN took effect was not heard) and then every notification as it arrives. When the
connection breaks (PostgreSQL restarted, the network went away) it reconnects by itself every
``retry_s``, and each successful (re)connection delivers RESYNC again: a notification lost
while disconnected costs a re-read, never an event.

A connection that dies silently (the host vanished, no RST) would otherwise wait forever for
the next notification: TCP keepalives and a ``SELECT 1`` every ``ping_s`` of silence find it.
Notifications that arrive during the ping are kept by psycopg and handed out by the next
``notifies()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from server.jobs.store.notifications import (
    EVENTS_CHANNEL,
    JOBS_CHANNEL,
    Notification,
    NotificationKind,
    NotificationListeners,
    parse_notification,
)

__all__ = ["PostgresListener"]

log = logging.getLogger(__name__)

_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}


class PostgresListener:
    def __init__(
        self,
        url: str,
        connect_kwargs: dict[str, Any],
        listeners: NotificationListeners,
        *,
        retry_s: float = 0.5,
        ping_s: float = 10.0,
    ) -> None:
        self._url = url
        self._connect_kwargs = {**_KEEPALIVES, **connect_kwargs, "autocommit": True}
        self._listeners = listeners
        self._retry_s = retry_s
        self._ping_s = ping_s
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()  # set while LISTENing (tests and health wait on it)
        self.connections = 0  # successful (re)connections so far
        self.backend_pid: int | None = None  # the LISTEN session's server process (while connected)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="job-store-listen")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected.clear()

    async def _run(self) -> None:
        down_logged = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self._url, **self._connect_kwargs)
            except psycopg.Error as exc:
                if not down_logged:
                    log.warning("job store LISTEN connection failed; retrying", extra={"error": str(exc)})
                    down_logged = True
                await asyncio.sleep(self._retry_s)
                continue
            try:
                async with conn:
                    for channel in (EVENTS_CHANNEL, JOBS_CHANNEL):
                        await conn.execute(f"LISTEN {channel}")
                    self.backend_pid = conn.info.backend_pid
                    self.connections += 1
                    self.connected.set()
                    if down_logged:
                        log.info("job store LISTEN connection is back")
                    down_logged = False
                    self._listeners.deliver(Notification(NotificationKind.RESYNC))
                    await self._receive(conn)
            except psycopg.Error as exc:
                self.connected.clear()
                if not down_logged:
                    log.warning("job store LISTEN connection lost; reconnecting", extra={"error": str(exc)})
                    down_logged = True
            finally:
                self.connected.clear()
            await asyncio.sleep(self._retry_s)

    async def _receive(self, conn: psycopg.AsyncConnection[Any]) -> None:
        deliver = self._listeners.deliver
        while True:
            received = False
            async for notify in conn.notifies(timeout=self._ping_s):
                received = True
                notification = parse_notification(notify.channel, notify.payload)
                if notification is not None:
                    deliver(notification)
            if not received:
                await conn.execute("SELECT 1")  # raises if the connection is dead
