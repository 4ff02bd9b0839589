"""A tracking session as bytes and back (server/sam2/session.py): what a draining replica
hands to the shared store. No Triton here: the session is built from the SAMURAI core directly,
and the restored one must read exactly what the original would for the next frames."""

from __future__ import annotations

import numpy as np
import pytest

from server.sam2.frame_calls import memory_rows
from server.sam2.samurai import CandidateSelector, MemoryBank, SamuraiConfig
from server.sam2.samurai.snapshot import ArrayTable, pack
from server.sam2.session import SnapshotError, TrackedObject, TrackingSession, dump_session, load_session
from tests.unit.sam2.test_samurai_snapshot import fed_bank_and_selector


def live_session() -> TrackingSession:
    config = SamuraiConfig(stable_frames_threshold=6, memory_bank_iou_threshold=0.4)
    session = TrackingSession(config, session_id="3f2b9c1e-client-key", width=360, height=240, next_frame_index=31)
    for object_id, seed in ((4, 1), (2, 2)):
        bank, selector = fed_bank_and_selector(config, 30, seed=seed)
        selector.box_space = (256, 256)
        obj = TrackedObject(object_id, selector, bank, slots={"sam2_track_step": 3})
        # As the video predictor leaves it: the ids of the memories last sent, in their rows.
        memories = bank.select_for(31).memories
        obj.sent_memories = [id(memories[i]) for i in memory_rows([], memories)][::-1]
        session.objects[object_id] = obj
    return session


def test_a_session_round_trips_with_everything_the_next_frame_reads() -> None:
    session = live_session()
    blob = dump_session(session)
    restored = load_session(blob)

    assert (restored.session_id, restored.width, restored.height, restored.next_frame_index) == ("3f2b9c1e-client-key", 360, 240, 31)
    assert restored.config == session.config
    assert list(restored.objects) == [4, 2]  # object order kept
    assert not restored.attached
    for object_id, obj in session.objects.items():
        back = restored.objects[object_id]
        assert back.object_id == object_id
        assert back.selector.mean.tobytes() == obj.selector.mean.tobytes()  # type: ignore[union-attr]
        assert back.selector.covariance.tobytes() == obj.selector.covariance.tobytes()  # type: ignore[union-attr]
        assert back.selector.stable_frames == obj.selector.stable_frames and back.selector.box_space == (256, 256)
        assert back.selector.config is restored.config and back.bank.config is restored.config
        assert back.slots == {}  # Triton slot hints are the old replica's
        a, b = obj.bank.select_for(31), back.bank.select_for(31)
        assert (a.memory_frames, a.tpos, a.obj_ptr_frames, a.obj_ptr_tdiff) == (b.memory_frames, b.tpos, b.obj_ptr_frames, b.obj_ptr_tdiff)
        assert [m.tobytes() for m in a.memories] == [m.tobytes() for m in b.memories]
        assert [p.tobytes() for p in a.obj_ptrs] == [p.tobytes() for p in b.obj_ptrs]
        # The memories go to the same rows of memory attention as they would have.
        assert memory_rows(obj.sent_memories, a.memories) == memory_rows(back.sent_memories, b.memories)
        assert memory_rows(back.sent_memories, b.memories) != list(range(len(b.memories)))  # the kept order is not the default
    assert session.memory_bytes() == restored.memory_bytes()
    # The bytes are about the arrays: a header of a few KiB on top.
    assert session.memory_bytes() < len(blob) < session.memory_bytes() + 64 * 1024


def test_an_empty_session_round_trips() -> None:
    session = TrackingSession(SamuraiConfig())
    restored = load_session(dump_session(session))
    assert restored.session_id == session.session_id and restored.objects == {} and restored.next_frame_index == 0


def test_a_memory_no_longer_in_the_bank_matches_no_row() -> None:
    session = live_session()
    obj = session.objects[4]
    obj.sent_memories = [12345, *obj.sent_memories[1:]]  # an id of an array the bank dropped
    back = load_session(dump_session(session)).objects[4]
    assert back.sent_memories[0] == -1
    memories = back.bank.select_for(31).memories
    assert memory_rows(back.sent_memories, memories) == memory_rows(obj.sent_memories, obj.bank.select_for(31).memories)


def test_other_snapshots_are_refused() -> None:
    with pytest.raises(SnapshotError, match="not a tracking session"):
        load_session(pack({"kind": "something.else"}, ArrayTable()))
    with pytest.raises(SnapshotError, match="malformed"):
        load_session(pack({"kind": "framewise.tracking_session", "session_id": "x"}, ArrayTable()))
    with pytest.raises(SnapshotError, match="magic"):
        load_session(b"\x80\x04\x95" + b"\0" * 64)  # a pickle is not a snapshot


def test_a_bank_without_memories_is_carried_too() -> None:
    config = SamuraiConfig()
    session = TrackingSession(config, next_frame_index=1)
    bank = MemoryBank(config)
    bank.add_conditioning(0, np.ones((1, 64, 4, 4), np.float16), np.ones(256, np.float32))
    session.objects[1] = TrackedObject(1, CandidateSelector(config), bank)
    back = load_session(dump_session(session)).objects[1]
    assert back.bank.conditioning_frames == [0] and back.bank.stored_memory_frames == [] and back.selector.mean is None
