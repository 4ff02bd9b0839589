"""Tracking sessions: a bounded registry with idle-TTL eviction and resume by id."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from server.aio import cancel_and_wait
from server.errors import ServiceError, shown
from server.metrics import Metrics
from server.pipelines.tracking import TrackingSession
from server.tracking import SamuraiConfig

log = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(self, metrics: Metrics, *, max_sessions: int = 16, idle_ttl_s: float = 300.0) -> None:
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self._sessions: dict[str, TrackingSession] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, config: SamuraiConfig) -> TrackingSession:
        self.evict_idle()
        if len(self._sessions) >= self.max_sessions:
            raise ServiceError(
                f"all {self.max_sessions} tracking sessions are in use; close one, let idle ones expire "
                f"({self.idle_ttl_s:.0f} s), or retry later",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                retry_after_s=5.0,
            )
        session = TrackingSession(config)
        session.attached = True
        self._sessions[session.session_id] = session
        self._report()
        log.info("tracking session opened", extra={"session": session.session_id, "sessions": len(self._sessions)})
        return session

    def resume(self, session_id: str) -> TrackingSession:
        self.evict_idle()  # an expired session is gone even if the eviction loop has not run yet
        session = self._sessions.get(session_id)
        if session is None:
            raise ServiceError(
                f"tracking session {shown(session_id)} does not exist or has expired (idle TTL {self.idle_ttl_s:.0f} s); open a new one",
                code=grpc.StatusCode.NOT_FOUND,
            )
        if session.attached:
            raise ServiceError(
                f"tracking session {shown(session_id)} is driven by another stream right now", code=grpc.StatusCode.FAILED_PRECONDITION
            )
        session.attached = True
        session.last_active = time.monotonic()
        return session

    def detach(self, session: TrackingSession, *, keep: bool) -> None:
        """The stream is over: keep the session for resume (idle TTL from now) or release it."""
        session.attached = False
        session.last_active = time.monotonic()
        if not keep:
            self.release(session.session_id)
        self._report()

    def release(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.objects.clear()
            with contextlib.suppress(KeyError):  # never reported if it ended before its first frame
                self.metrics.tracking_session_bytes.remove(session_id)
            log.info("tracking session released", extra={"session": session_id, "sessions": len(self._sessions)})
        self._report()

    def evict_idle(self) -> None:
        now = time.monotonic()
        for session in [s for s in self._sessions.values() if not s.attached and now - s.last_active > self.idle_ttl_s]:
            log.info("tracking session expired", extra={"session": session.session_id})
            self.release(session.session_id)

    def _report(self) -> None:
        self.metrics.tracking_sessions.set(len(self._sessions))
        for session in self._sessions.values():
            self.metrics.tracking_session_bytes.labels(session.session_id).set(session.memory_bytes())

    def report(self, session: TrackingSession) -> None:
        if session.session_id in self._sessions:  # never re-create the label of a released session
            self.metrics.tracking_session_bytes.labels(session.session_id).set(session.memory_bytes())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._evict_forever(), name="session-eviction")

    async def _evict_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(self.idle_ttl_s / 4, 5.0)))
            self.evict_idle()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for session_id in list(self._sessions):
            self.release(session_id)
