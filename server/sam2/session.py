"""A tracking session: everything one video's tracking keeps between frames (SAM 2's
``inference_state``), and that state as bytes and back.

The bytes are what a draining replica hands to the shared store and what a resume on another
replica restores (server/sam2/session_registry.py moves them). The state carried is everything
the next frame reads: the session options (SamuraiConfig), the frame size and frame counter, and
per object its Kalman mean/covariance and warm-up counter, its memory bank (prompt-frame memories
and pointers, recent memories as stored with their frame indices and usable verdicts, the pointer
ring) and the order its memories were last sent to memory attention in. That order does not
change what attention computes mathematically, but a float sum in another order can differ in its
last bits; keeping it makes the restored session's masks byte-identical to an uninterrupted run's.
Replica-local things are left out: the Triton shared-memory slot hints (another replica has its
own slots) and the tenant (the handoff store keys the state by tenant instead).

The encoding is server.sam2.samurai.snapshot's versioned format (JSON header + raw numpy arrays,
no pickle). The state and its encoding live in one module so a field added to one is seen beside
the other.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from server.auth.principal import DEFAULT_TENANT
from server.sam2.samurai import CandidateSelector, MemoryBank, SamuraiConfig
from server.sam2.samurai.snapshot import (
    ArrayTable,
    SnapshotError,
    bank_from_json,
    bank_to_json,
    config_from_json,
    config_to_json,
    pack,
    selector_from_json,
    selector_to_json,
    unpack,
)

__all__ = ["SnapshotError", "TrackedObject", "TrackingSession", "dump_session", "load_session"]


@dataclass
class TrackedObject:
    object_id: int
    selector: CandidateSelector
    bank: MemoryBank
    # ids of the memories as last sent to memory attention, row by row (see
    # server.sam2.frame_calls.memory_rows), and the shared-memory slot per model they went to: the
    # object asks for the same slot again.
    sent_memories: list[int] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)


@dataclass
class TrackingSession:
    """Everything one video's tracking needs between frames."""

    config: SamuraiConfig
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    width: int = 0
    height: int = 0
    next_frame_index: int = 0
    objects: dict[int, TrackedObject] = field(default_factory=dict)
    last_active: float = field(default_factory=time.monotonic)
    # One stream at a time drives a session.
    attached: bool = False
    # The tenant that opened it (server.auth.principal.Principal.tenant): only it can resume it.
    # Not part of the handed-off snapshot: the handoff store keys the state by tenant instead.
    tenant: str = DEFAULT_TENANT

    def memory_bytes(self) -> int:
        return sum(o.bank.nbytes() for o in self.objects.values())


_KIND = "framewise.tracking_session"


def dump_session(session: TrackingSession) -> bytes:
    arrays = ArrayTable()
    header = {
        "kind": _KIND,
        "session_id": session.session_id,
        "width": session.width,
        "height": session.height,
        "next_frame_index": session.next_frame_index,
        "config": config_to_json(session.config),
        "objects": [_object_to_json(obj, arrays) for obj in session.objects.values()],
    }
    return pack(header, arrays)


def load_session(blob: bytes) -> TrackingSession:
    """The session ``dump_session`` wrote, detached; SnapshotError when the bytes are not one."""
    header, arrays = unpack(blob)
    if header.get("kind") != _KIND:
        raise SnapshotError(f"the snapshot holds {str(header.get('kind'))[:60]!r}, not a tracking session")
    try:
        config = config_from_json(header["config"])
        session = TrackingSession(
            config,
            session_id=str(header["session_id"]),
            width=int(header["width"]),
            height=int(header["height"]),
            next_frame_index=int(header["next_frame_index"]),
        )
        for data in header["objects"]:
            obj = _object_from_json(data, config, arrays)
            session.objects[obj.object_id] = obj
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        if isinstance(exc, SnapshotError):
            raise
        raise SnapshotError(f"tracking session snapshot is malformed: {type(exc).__name__}: {exc}") from None
    return session


def _object_to_json(obj: TrackedObject, arrays: ArrayTable) -> dict[str, Any]:
    bank = bank_to_json(obj.bank, arrays)
    # sent_memories holds id()s of the memory arrays as last sent; say which stored memory each
    # was, so the restored object sends them in the same rows again.
    state = obj.bank.export()
    where: dict[int, list[Any]] = {id(m): ["conditioning", t] for t, m, _ in state.conditioning}
    where.update({id(m): ["memory", t] for t, m, _ in state.memories})
    return {
        "object_id": obj.object_id,
        "selector": selector_to_json(obj.selector, arrays),
        "bank": bank,
        "sent_memories": [where.get(key) for key in obj.sent_memories],
    }


def _object_from_json(data: dict[str, Any], config: Any, arrays: ArrayTable) -> TrackedObject:
    bank = bank_from_json(data["bank"], config, arrays)
    state = bank.export()
    ids: dict[tuple[str, int], int] = {("conditioning", t): id(m) for t, m, _ in state.conditioning}
    ids.update({("memory", t): id(m) for t, m, _ in state.memories})
    # A memory sent last time that the bank no longer holds matches nothing now, as it would not
    # have in the uninterrupted run either: -1 is no array's id.
    sent = [-1 if ref is None else ids.get((str(ref[0]), int(ref[1])), -1) for ref in data["sent_memories"]]
    return TrackedObject(
        object_id=int(data["object_id"]),
        selector=selector_from_json(data["selector"], config, arrays),
        bank=bank,
        sent_memories=sent,
    )

