"""Wake-ups that every replica sharing a job store receives: "an event was committed", "work was
queued", "a cancel was requested", and "you may have missed some: re-read" (after the
listening connection was (re)established).

A notification carries no data that matters for correctness, only *what to re-read*: the
store stays the one source of truth, so a lost, duplicated or late notification can cost a read
but never an event. On PostgreSQL they are LISTEN/NOTIFY messages sent in the same transaction
as the write they announce (delivered only after it commits, in commit order); on SQLite (one
replica) the store calls its listeners in process after the write commits.

Payloads on the wire (PostgreSQL), short text because NOTIFY payloads are limited to 8000 bytes:

    framewise_events   "<operation name>:<sequence>"   an event was appended
    framewise_jobs     "queued:<operation name>"       a new operation waits to be claimed
                       "cancel:<operation name>"       cancel requested (Cancel/Delete RPC)
                       "released:<operation name>"     a lease was handed back (drain)
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "EVENTS_CHANNEL",
    "JOBS_CHANNEL",
    "Notification",
    "NotificationKind",
    "NotificationListeners",
    "parse_notification",
]

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "framewise_events"
JOBS_CHANNEL = "framewise_jobs"


class NotificationKind(enum.StrEnum):
    EVENT = "event"  # operation's event ``sequence`` is committed (EVENTS_CHANNEL)
    QUEUED = "queued"  # operation created, waiting to be claimed (JOBS_CHANNEL)
    CANCEL = "cancel"  # cancel requested for operation (JOBS_CHANNEL)
    RELEASED = "released"  # operation's lease handed back: claimable now (JOBS_CHANNEL)
    # Listening (re)started: notifications sent while it was not listening are lost, so every
    # listener must re-read what it waits for (watchers: events after their cursor; the
    # engine: claimable work and cancel flags). ``operation`` is "".
    RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class Notification:
    kind: NotificationKind
    operation: str = ""
    sequence: int = 0  # EVENT only


def parse_notification(channel: str, payload: str) -> Notification | None:
    """The Notification a NOTIFY payload stands for; None for one this code does not know
    (a newer replica's kind during a rolling upgrade: ignored, not fatal)."""
    try:
        if channel == EVENTS_CHANNEL:
            name, _, sequence = payload.rpartition(":")
            return Notification(NotificationKind.EVENT, name, int(sequence)) if name else None
        if channel == JOBS_CHANNEL:
            kind, _, name = payload.partition(":")
            if kind in (NotificationKind.QUEUED, NotificationKind.CANCEL, NotificationKind.RELEASED) and name:
                return Notification(NotificationKind(kind), name)
    except ValueError:
        pass
    return None


Listener = Callable[[Notification], None]


class NotificationListeners:
    """The callbacks registered with one store. Callbacks run on the store's event loop and
    must not block (they set flags, wake futures, start tasks); one that raises is logged and
    the others still run."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def add(self, callback: Listener) -> Callable[[], None]:
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    def __len__(self) -> int:
        return len(self._listeners)

    def deliver(self, notification: Notification) -> None:
        for callback in tuple(self._listeners):
            try:
                callback(notification)
            except Exception:
                log.exception("job store notification listener failed", extra={"notification": str(notification)})
