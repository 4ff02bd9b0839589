"""Tracking sessions: a bounded registry with idle-TTL eviction, resume by id, and the handoff of
live sessions to the shared store when the replica drains.

A session lives in one replica's memory (its memory bank is megabytes of features the next
frame reads). With several replicas, the client names the session (its key, the session id)
and the load balancer hashes that key, so the open and every resume reach the same replica. On
SIGTERM the replica drains: it opens no more sessions, and writes each live session's state to
the shared job store (server/sam2/session.py encodes it); a resume reaching any replica whose
registry lacks the key takes that state and tracks on exactly where the session stopped.

A session belongs to the tenant that opened it: the registry holds sessions under
``(tenant, key)`` and the handoff store keys their state the same way, so two tenants may use
the same key, and a resume by another tenant is NOT_FOUND with exactly the message of a key
nobody holds (``UnknownSession.other_tenant`` tells the servicer to audit it).

Metrics carry no session id: the memory-bank gauges are aggregates over the held sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import grpc

from server.aio import cancel_and_wait
from server.auth.principal import DEFAULT_TENANT
from server.errors import ServiceError, Unavailable, shown
from server.metrics import Metrics
from server.sam2.samurai import SamuraiConfig
from server.sam2.session import SnapshotError, TrackingSession, dump_session, load_session

log = logging.getLogger(__name__)

# The metadata key clients name their session with, and the load balancer hashes.
SESSION_KEY_METADATA = "x-framewise-session"


class SessionHandoff(Protocol):
    """Where a draining replica leaves its sessions (the shared JobStore implements it)."""

    async def put_session_state(self, key: str, state: bytes, ttl_s: float, *, tenant: str = DEFAULT_TENANT) -> None: ...

    async def take_session_state(self, key: str, *, tenant: str = DEFAULT_TENANT) -> bytes | None: ...


class UnknownSession(ServiceError):
    """NOT_FOUND for a resume; ``other_tenant`` when this replica holds the key for another
    tenant (the message does not say so: it is the unknown key's, word for word)."""

    def __init__(self, message: str, *, other_tenant: bool) -> None:
        super().__init__(message, code=grpc.StatusCode.NOT_FOUND)
        self.other_tenant = other_tenant


class SessionRegistry:
    def __init__(
        self,
        metrics: Metrics,
        *,
        max_sessions: int = 16,
        idle_ttl_s: float = 300.0,
        replica_id: str = "",
        handoff: SessionHandoff | None = None,
    ) -> None:
        self.metrics = metrics
        self.max_sessions = max_sessions
        self.idle_ttl_s = idle_ttl_s
        self.replica_id = replica_id
        self.handoff = handoff
        # Keyed by (tenant, session id): a key is unique within its tenant only.
        self._sessions: dict[tuple[str, str], TrackingSession] = {}
        self._task: asyncio.Task[None] | None = None
        # Set on drain: streams end after their current frame and hand their session off.
        self.draining = asyncio.Event()

    def __len__(self) -> int:
        return len(self._sessions)

    def held(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> TrackingSession | None:
        """The session ``tenant`` holds under this id on this replica, if any."""
        return self._sessions.get((tenant, session_id))

    def open(self, config: SamuraiConfig, key: str | None = None, *, tenant: str = DEFAULT_TENANT) -> TrackingSession:
        """A new session of ``tenant``, attached; ``key`` (the client's session key) becomes its id."""
        self._refuse_while_draining()
        self.evict_idle()
        if key is not None and (tenant, key) in self._sessions:
            raise ServiceError(
                f"tracking session {shown(key)} already exists on this replica; resume it (resume_session_id) "
                "or open the new session under another key",
                code=grpc.StatusCode.ALREADY_EXISTS,
            )
        self._check_room()
        session = TrackingSession(config) if key is None else TrackingSession(config, session_id=key)
        session.tenant = tenant
        session.attached = True
        self._sessions[(tenant, session.session_id)] = session
        self._report()
        log.info("tracking session opened", extra={"session": session.session_id, "sessions": len(self._sessions)})
        return session

    def _check_room(self) -> None:
        if len(self._sessions) >= self.max_sessions:
            raise ServiceError(
                f"all {self.max_sessions} tracking sessions are in use; close one, let idle ones expire "
                f"({self.idle_ttl_s:.0f} s), or retry later",
                code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                retry_after_s=5.0,
            )

    def _refuse_while_draining(self) -> None:
        if self.draining.is_set():
            raise Unavailable(
                f"replica {shown(self.replica_id)} is draining and opens no sessions; retry: the load balancer "
                "sends you to another replica, where a session this one held resumes from its handed-off state",
                retry_after_s=0.5,
            )

    async def resume(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> TrackingSession:
        """``tenant``'s session to drive again: from this replica's memory, else from the state a
        draining replica handed off to the shared store (taken: no other replica can restore it
        too). Another tenant's session is not found, exactly as a key nobody holds."""
        self._refuse_while_draining()
        self.evict_idle()  # an expired session is gone even if the eviction loop has not run yet
        session = self._sessions.get((tenant, session_id))
        if session is None and self.handoff is not None:
            self._check_room()
            session = await self._take_handed_off(session_id, tenant)
        if session is None:
            raise UnknownSession(
                f"tracking session {shown(session_id)} is not held by replica {shown(self.replica_id)} and no replica "
                f"handed it off (it never existed here, expired after its idle TTL of {self.idle_ttl_s:.0f} s, or lives "
                f"on another replica); reconnect with metadata {SESSION_KEY_METADATA}: {shown(session_id)} so the load "
                "balancer routes you to its replica, or open a new session",
                other_tenant=any(sid == session_id for _t, sid in self._sessions),
            )
        if session.attached:
            raise ServiceError(
                f"tracking session {shown(session_id)} is driven by another stream right now", code=grpc.StatusCode.FAILED_PRECONDITION
            )
        session.attached = True
        session.last_active = time.monotonic()
        return session

    async def _take_handed_off(self, session_id: str, tenant: str) -> TrackingSession | None:
        assert self.handoff is not None
        try:
            blob = await self.handoff.take_session_state(session_id, tenant=tenant)
        except Exception as exc:  # noqa: BLE001 - the store is down or refused: say so, retryably
            raise Unavailable(
                f"cannot look up the handed-off state of tracking session {shown(session_id)}: {shown(exc, 200)}; retry",
                retry_after_s=1.0,
            ) from exc
        held = self._sessions.get((tenant, session_id))
        if held is not None or blob is None:
            return held  # another stream on this replica took it while this one waited
        try:
            session = await asyncio.to_thread(load_session, blob)
        except SnapshotError as exc:
            # A format this code cannot read (a newer replica wrote it): leave it for one that can.
            self.metrics.tracking_handoffs.labels("in", "failed").inc()
            await self.handoff.put_session_state(session_id, blob, self.idle_ttl_s, tenant=tenant)
            raise ServiceError(
                f"the handed-off state of tracking session {shown(session_id)} cannot be read by replica "
                f"{shown(self.replica_id)}: {shown(exc, 200)}",
                code=grpc.StatusCode.FAILED_PRECONDITION,
            ) from exc
        if len(self._sessions) >= self.max_sessions:
            await self.handoff.put_session_state(session_id, blob, self.idle_ttl_s, tenant=tenant)
            self._check_room()
        session.tenant = tenant
        self._sessions[(tenant, session_id)] = session
        self.metrics.tracking_handoffs.labels("in", "ok").inc()
        log.info(
            "tracking session restored from its handoff",
            extra={"session": session_id, "bytes": len(blob), "next_frame": session.next_frame_index, "sessions": len(self._sessions)},
        )
        self._report()
        return session

    async def hand_off(self, session: TrackingSession) -> bool:
        """Writes the session's state to the shared store for another replica to resume, and
        releases it here. False (logged) when there is no store or the write failed: the
        session is then lost, as it would have been without a handoff."""
        if self.handoff is None:
            self.metrics.tracking_handoffs.labels("out", "failed").inc()
            self.release(session.session_id, tenant=session.tenant)
            return False
        try:
            blob = await asyncio.to_thread(dump_session, session)
            await self.handoff.put_session_state(session.session_id, blob, self.idle_ttl_s, tenant=session.tenant)
        except Exception:  # noqa: BLE001 - logged; the drain goes on with the other sessions
            log.exception("tracking session handoff failed", extra={"session": session.session_id})
            self.metrics.tracking_handoffs.labels("out", "failed").inc()
            self.release(session.session_id, tenant=session.tenant)
            return False
        self.metrics.tracking_handoffs.labels("out", "ok").inc()
        log.info(
            "tracking session handed off",
            extra={"session": session.session_id, "bytes": len(blob), "next_frame": session.next_frame_index,
                   "objects": len(session.objects)},
        )
        self.release(session.session_id, tenant=session.tenant)
        return True

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM: open nothing more; hand every session off. Detached sessions go at once;
        a stream driving one finishes its current frame, hands its session off itself and ends
        with UNAVAILABLE (server/servicers/tracking.py); this waits for those up to timeout_s."""
        self.draining.set()
        started = time.monotonic()
        handed = 0
        for session in [s for s in self._sessions.values() if not s.attached]:
            handed += await self.hand_off(session)
        deadline = started + timeout_s
        while any(s.attached for s in self._sessions.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = [s.session_id for s in self._sessions.values() if s.attached]
        log.info(
            "tracking sessions drained",
            extra={"handed_off_detached": handed, "still_attached": len(left), "duration_ms": round((time.monotonic() - started) * 1e3, 1)},
        )

    def detach(self, session: TrackingSession, *, keep: bool) -> None:
        """The stream is over: keep the session for resume (idle TTL from now) or release it."""
        session.attached = False
        session.last_active = time.monotonic()
        if not keep:
            self.release(session.session_id, tenant=session.tenant)
        self._report()

    def release(self, session_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        session = self._sessions.pop((tenant, session_id), None)
        if session is not None:
            session.objects.clear()
            log.info("tracking session released", extra={"session": session_id, "sessions": len(self._sessions)})
        self._report()

    def evict_idle(self) -> None:
        now = time.monotonic()
        for session in [s for s in self._sessions.values() if not s.attached and now - s.last_active > self.idle_ttl_s]:
            log.info("tracking session expired", extra={"session": session.session_id})
            self.release(session.session_id, tenant=session.tenant)

    def _report(self) -> None:
        # Aggregates only: a label per session would publish every session id (the key a
        # resume needs) on /metrics and grow without bound.
        sizes = [s.memory_bytes() for s in self._sessions.values()]
        self.metrics.tracking_sessions.set(len(sizes))
        self.metrics.tracking_session_bytes.set(sum(sizes))
        self.metrics.tracking_session_bytes_max.set(max(sizes, default=0))

    def report(self, session: TrackingSession) -> None:
        """After a frame: the session's bank changed size."""
        self._report()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._evict_forever(), name="session-eviction")

    async def _evict_forever(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(self.idle_ttl_s / 4, 5.0)))
            self.evict_idle()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for tenant, session_id in list(self._sessions):
            self.release(session_id, tenant=tenant)
