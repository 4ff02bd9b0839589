"""SAMURAI's memory bank (server/sam2/samurai/memory_bank.py): which memories and object
pointers memory attention reads, which frames are kept, against a literal transcription of the
reference's loops; pure numpy.

Reference behaviour: yangchris11/samurai, sam2/sam2/modeling/sam2_base.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from server.sam2.samurai import MemoryBank, SamuraiConfig


def mem(frame: int) -> np.ndarray:
    return np.full((2, 2, 2), frame, dtype=np.float16)


def ptr(frame: int) -> np.ndarray:
    return np.full(4, frame, dtype=np.float32)


# frame: (predicted IoU, object score logit, kf score)
SCENARIO = {
    1: (0.9, 5.0, None),  # usable by scores, but the reference's walk never reaches frame 1
    2: (0.9, 5.0, None),
    3: (0.9, 5.0, None),
    4: (0.9, 5.0, None),
    5: (0.9, 5.0, 0.8),
    6: (0.9, -0.5, 0.8),  # object score not > 0
    7: (0.6, 2.0, 0.4),
    8: (0.9, 2.0, 0.0),  # kf score not > 0
    9: (0.51, 0.1, 0.01),
    10: (0.2, 3.0, 0.9),  # predicted IoU not > 0.5, but it is the previous frame of 11
}


def scenario_bank(config: SamuraiConfig | None = None) -> MemoryBank:
    bank = MemoryBank(config)
    bank.add_conditioning(0, mem(0), ptr(0))
    for f, (iou, obj, kf) in SCENARIO.items():
        bank.add_frame(f, mem(f), ptr(f), iou, obj, kf)
    return bank


def test_memory_selection_filters_frames_and_keeps_previous_and_prompt():
    sel = scenario_bank().select_for(11)
    # Walk back from 10 to 2: usable 9, 7, 5, 4, 3, 2 -> [2, 3, 4, 5, 7, 9]; 10 is appended as the
    # previous frame -> [2, 3, 4, 5, 7, 9, 10]; the last 6 get t_pos 1..6 by ORDER: frame 3 gets
    # t_pos 1 although it is 8 frames back. The prompt frame 0 gets t_pos 0.
    assert sel.memory_frames == [0, 3, 4, 5, 7, 9, 10]
    assert sel.tpos == [0, 1, 2, 3, 4, 5, 6]
    assert sel.tpos_enc_index == [6, 5, 4, 3, 2, 1, 0]  # maskmem_tpos_enc[num_maskmem - t_pos - 1]
    assert [int(m.flat[0]) for m in sel.memories] == sel.memory_frames
    # Pointers are not filtered: prompt (t diff 11 - 0) then frames 10, 9, ..., 1 (t diff 1..10).
    assert sel.obj_ptr_frames == [0, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    assert sel.obj_ptr_tdiff == [11, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [int(p[0]) for p in sel.obj_ptrs] == sel.obj_ptr_frames
    assert sel.obj_ptr_tdiff_max == 15


def test_unusable_frame_is_dropped_once_it_is_no_longer_previous():
    bank = scenario_bank()
    assert bank.stored_memory_frames == [3, 4, 5, 7, 9, 10]  # exactly what frame 11 can use
    bank.add_frame(11, mem(11), ptr(11), 0.9, 1.0, 0.5)
    # usable [2, 3, 4, 5, 7, 9, 11]; 11 is the previous frame and usable -> last 6: [3, 4, 5, 7, 9, 11]
    assert bank.select_for(12).memory_frames == [0, 3, 4, 5, 7, 9, 11]
    assert bank.stored_memory_frames == [3, 4, 5, 7, 9, 11]


def test_first_frames_and_the_walk_quirk():
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    first = bank.select_for(1)
    assert (first.memory_frames, first.tpos, first.obj_ptr_frames, first.obj_ptr_tdiff) == ([0], [0], [0], [1])
    bank.add_frame(1, mem(1), ptr(1), 0.9, 5.0, None)
    assert bank.select_for(2).memory_frames == [0, 1] and bank.select_for(2).tpos == [0, 6]
    bank.add_frame(2, mem(2), ptr(2), 0.9, 5.0, None)
    # range(2, 1, -1) == [2]: frame 1 is never walked to, so only the prompt and frame 2.
    assert bank.select_for(3).memory_frames == [0, 2]
    plain = MemoryBank(SamuraiConfig(memory_walk_skips_first_tracked_frame=False))
    plain.add_conditioning(0, mem(0), ptr(0))
    plain.add_frame(1, mem(1), ptr(1), 0.9, 5.0, None)
    plain.add_frame(2, mem(2), ptr(2), 0.9, 5.0, None)
    assert plain.select_for(3).memory_frames == [0, 1, 2] and plain.select_for(3).tpos == [0, 5, 6]


def test_missing_previous_frame_still_takes_its_slot():
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    for f in range(1, 6):
        bank.add_frame(f, mem(f), ptr(f), 0.9, 5.0, None)
    # Frame 6 never tracked: [2, 3, 4, 5] + [6] -> t_pos 2..6, frame 6 absent -> t_pos 6 unused.
    sel = bank.select_for(7)
    assert sel.memory_frames == [0, 2, 3, 4, 5] and sel.tpos == [0, 2, 3, 4, 5]
    assert sel.obj_ptr_tdiff == [7, 2, 3, 4, 5, 6]


def test_memory_thresholds_are_configurable():
    strict = scenario_bank(SamuraiConfig(memory_bank_iou_threshold=0.95)).select_for(11)
    assert strict.memory_frames == [0, 10]  # nothing usable: prompt + previous frame
    lenient = scenario_bank(SamuraiConfig(memory_bank_kf_score_threshold=-1.0)).select_for(11)
    assert lenient.memory_frames == [0, 4, 5, 7, 8, 9, 10]  # frame 8 (kf 0.0) now usable
    obj = scenario_bank(SamuraiConfig(memory_bank_obj_score_threshold=-1.0)).select_for(11)
    assert obj.memory_frames == [0, 4, 5, 6, 7, 9, 10]  # frame 6 (logit -0.5) now usable
    few = scenario_bank(SamuraiConfig(num_maskmem=3, max_obj_ptrs=4)).select_for(11)
    assert few.memory_frames == [0, 9, 10] and few.tpos == [0, 1, 2]
    assert few.obj_ptr_frames == [0, 10, 9, 8] and few.obj_ptr_tdiff_max == 3


def test_pointer_window_follows_num_frames():
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    for f in range(1, 9):
        bank.add_frame(f, mem(f), ptr(f), 0.9, 5.0, None)
    sel = bank.select_for(9, num_frames=10)
    # max pointers = min(10, 16) = 10: t diff 1..9 -> frames 8..1 (0 is the prompt, counted once).
    assert sel.obj_ptr_tdiff == [9, 1, 2, 3, 4, 5, 6, 7, 8] and sel.obj_ptr_tdiff_max == 9


def test_prompt_on_a_tracked_frame_replaces_it_and_order_is_enforced():
    bank = scenario_bank()
    bank.add_conditioning(10, mem(100), ptr(100))
    sel = bank.select_for(11)
    # Two prompts at t_pos 0; the previous frame (10) is now a prompt: its slot (t_pos 6) is consumed,
    # unused, as in the reference (its walk would raise KeyError on a prompt frame; prompts are skipped here).
    assert sel.memory_frames == [0, 10, 3, 4, 5, 7, 9] and sel.tpos == [0, 0, 1, 2, 3, 4, 5]
    assert sel.obj_ptr_frames[:3] == [0, 10, 9] and sel.obj_ptr_tdiff[:3] == [11, 1, 2]
    with pytest.raises(ValueError):
        bank.add_frame(10, mem(10), ptr(10), 0.9, 1.0, None)
    with pytest.raises(ValueError):
        bank.add_frame(5, mem(5), ptr(5), 0.9, 1.0, None)
    with pytest.raises(ValueError):
        bank.select_for(9)
    with pytest.raises(ValueError):
        MemoryBank().select_for(3)


def reference_selection(records: dict, frame_idx: int, num_frames: int | None = None):
    """The reference loops, literally, over every frame ever tracked (prompt on frame 0)."""
    valid = []
    if frame_idx > 1:
        for i in range(frame_idx - 1, 1, -1):
            iou, obj, kf = records[i]
            if iou > 0.5 and obj > 0.0 and (kf is None or kf > 0.0):
                valid.insert(0, i)
            if len(valid) >= 16 - 1:
                break
    if frame_idx - 1 not in valid:
        valid.append(frame_idx - 1)
    frames, tpos = [0], [0]
    for t_pos in range(1, 7):
        idx = t_pos - 7
        if idx < -len(valid):
            continue
        if valid[idx] in records:
            frames.append(valid[idx])
            tpos.append(t_pos)
    max_ptrs = min(num_frames, 16) if num_frames is not None else 16
    ptr_frames, tdiff = [0], [frame_idx]
    for t_diff in range(1, max_ptrs):
        t = frame_idx - t_diff
        if t < 0:
            break
        if t in records:
            ptr_frames.append(t)
            tdiff.append(t_diff)
    return frames, tpos, ptr_frames, tdiff


def test_long_run_is_bounded_and_matches_the_unpruned_reference():
    rng = np.random.default_rng(7)
    bank = MemoryBank()
    bank.add_conditioning(0, mem(0), ptr(0))
    records: dict[int, tuple] = {}
    for f in range(1, 201):
        sel = bank.select_for(f)
        assert (sel.memory_frames, sel.tpos, sel.obj_ptr_frames, sel.obj_ptr_tdiff) == reference_selection(records, f)
        assert len(sel.memories) <= 7 and len(sel.obj_ptrs) <= 16
        assert [int(m.flat[0]) for m in sel.memories] == sel.memory_frames
        iou = float(rng.uniform(0.2, 1.0))
        obj = float(rng.normal(1.0, 2.0))
        kf = None if rng.random() < 0.2 else float(rng.uniform(-0.2, 1.0))
        records[f] = (iou, obj, kf)
        bank.add_frame(f, mem(f), ptr(f), iou, obj, kf)
        assert len(bank.stored_memory_frames) <= 6 and len(bank.stored_pointer_frames) <= 15
    final = bank.select_for(201)
    assert len(final.obj_ptrs) == 16 and final.obj_ptr_tdiff == [201, *range(1, 16)]


def test_conditioning_frames_stay_bounded() -> None:
    # A client correcting every frame must not grow the bank without bound: the first prompt and
    # the most recent corrections are kept (max_conditioning_frames, 4 by default).
    bank = MemoryBank(SamuraiConfig())
    memory, pointer = np.zeros((1, 4, 2, 2), np.float16), np.zeros(8, np.float32)
    for frame in range(50):
        bank.add_conditioning(frame, memory, pointer)
    assert bank.conditioning_frames == [0, 47, 48, 49]
    unbounded = MemoryBank(SamuraiConfig(max_conditioning_frames=None))
    for frame in range(50):
        unbounded.add_conditioning(frame, memory, pointer)
    assert len(unbounded.conditioning_frames) == 50
