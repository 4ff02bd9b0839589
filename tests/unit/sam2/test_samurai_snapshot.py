"""The versioned snapshot format of SAMURAI state (server/sam2/samurai/snapshot.py), pure numpy: exact
round trips, and refusal of what this code did not write (another version, pickled objects,
truncation)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from server.sam2.samurai import CandidateSelector, MemoryBank, SamuraiConfig
from server.sam2.samurai.snapshot import (
    FORMAT_VERSION,
    MAGIC,
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


def fed_bank_and_selector(config: SamuraiConfig, frames: int, seed: int = 0) -> tuple[MemoryBank, CandidateSelector]:
    """A bank and selector after a prompt on frame 0 and ``frames`` tracked frames of a box moving
    right, with some frames below the memory thresholds."""
    rng = np.random.default_rng(seed)
    bank, selector = MemoryBank(config), CandidateSelector(config)
    bank.add_conditioning(0, rng.standard_normal((1, 64, 8, 8)).astype(np.float16), rng.standard_normal(256).astype(np.float32))
    for t in range(1, frames + 1):
        x = 10.0 + 2.0 * t
        boxes = np.array([[x, 20, x + 30, 60], [x + 9, 20, x + 39, 60], [0, 0, 5, 5]], dtype=np.float64)
        ious = np.array([0.9, 0.92, 0.2], dtype=np.float32) if t % 7 else np.array([0.2, 0.25, 0.1], dtype=np.float32)
        choice = selector.select_boxes(boxes, ious, 3.0)
        bank.add_frame(
            t,
            rng.standard_normal((1, 64, 8, 8)).astype(np.float16),
            rng.standard_normal(256).astype(np.float32),
            choice.predicted_iou,
            choice.object_score_logit,
            choice.kf_score,
        )
    return bank, selector


def round_trip(header: dict, arrays: ArrayTable) -> tuple[dict, ArrayTable]:
    return unpack(pack(header, arrays))


def test_bank_round_trip_is_exact_and_selects_the_same() -> None:
    config = SamuraiConfig()
    bank, _ = fed_bank_and_selector(config, 40)
    arrays = ArrayTable()
    header, back = round_trip({"bank": bank_to_json(bank, arrays)}, arrays)
    restored = bank_from_json(header["bank"], config, back)

    a, b = bank.export(), restored.export()
    assert (a.first_conditioning, a.last_frame) == (b.first_conditioning, b.last_frame) == (0, 40)
    assert [t for t, *_ in a.conditioning] == [t for t, *_ in b.conditioning]
    assert [(t, u) for t, _, u in a.memories] == [(t, u) for t, _, u in b.memories]
    assert [t for t, _ in a.pointers] == [t for t, _ in b.pointers] and len(a.pointers) == config.max_obj_ptrs - 1
    for (_, m1, p1), (_, m2, p2) in zip(a.conditioning, b.conditioning, strict=True):
        assert m1.dtype == m2.dtype == np.float16 and m1.tobytes() == m2.tobytes() and p1.tobytes() == p2.tobytes()
    for (_, m1, _), (_, m2, _) in zip(a.memories, b.memories, strict=True):
        assert m1.dtype == m2.dtype and m1.shape == m2.shape and m1.tobytes() == m2.tobytes()

    # What the next frames read is the same, frame after frame, fed the same outputs.
    rng = np.random.default_rng(7)
    for t in range(41, 60):
        sa, sb = bank.select_for(t), restored.select_for(t)
        assert sa.memory_frames == sb.memory_frames and sa.tpos == sb.tpos
        assert sa.obj_ptr_frames == sb.obj_ptr_frames and sa.obj_ptr_tdiff == sb.obj_ptr_tdiff
        assert all(x.tobytes() == y.tobytes() for x, y in zip(sa.memories, sb.memories, strict=True))
        memory, pointer = rng.standard_normal((1, 64, 8, 8)).astype(np.float16), rng.standard_normal(256).astype(np.float32)
        iou = float(rng.uniform(0.3, 1.0))
        bank.add_frame(t, memory, pointer, iou, 1.0, None)
        restored.add_frame(t, memory, pointer, iou, 1.0, None)


def test_selector_round_trip_keeps_the_kalman_state_and_warm_up_counter() -> None:
    config = SamuraiConfig(stable_frames_threshold=5)
    _, selector = fed_bank_and_selector(config, 12)
    selector.box_space = (256, 256)
    arrays = ArrayTable()
    header, back = round_trip({"selector": selector_to_json(selector, arrays)}, arrays)
    restored = selector_from_json(header["selector"], config, back)
    assert restored.mean is not None and selector.mean is not None
    assert restored.mean.dtype == np.float64 and restored.mean.tobytes() == selector.mean.tobytes()
    assert restored.covariance.tobytes() == selector.covariance.tobytes()  # type: ignore[union-attr]
    assert restored.stable_frames == selector.stable_frames and restored.box_space == (256, 256)
    # Same state, same choices from here on (the stable phase weighs the Kalman prediction).
    for t in range(13, 30):
        x = 10.0 + 2.0 * t
        boxes = np.array([[x, 20, x + 30, 60], [x + 30, 20, x + 60, 60], [0, 0, 5, 5]])
        ious = np.array([0.8, 0.85, 0.1], dtype=np.float32)
        a, b = selector.select_boxes(boxes, ious, 2.0), restored.select_boxes(boxes, ious, 2.0)
        assert (a.index, a.kf_score, a.phase, a.kalman_selected) == (b.index, b.kf_score, b.phase, b.kalman_selected)
    assert selector.mean.tobytes() == restored.mean.tobytes()


def test_a_fresh_selector_round_trips_without_a_filter() -> None:
    arrays = ArrayTable()
    header, back = round_trip({"selector": selector_to_json(CandidateSelector(), arrays)}, arrays)
    restored = selector_from_json(header["selector"], SamuraiConfig(), back)
    assert restored.mean is None and restored.covariance is None and restored.stable_frames == 0


def test_config_round_trips_every_knob() -> None:
    config = SamuraiConfig(kf_score_weight=0.15, stable_frames_threshold=9, memory_bank_iou_threshold=0.1 + 0.2,
                           max_conditioning_frames=None)
    header, _ = round_trip({"config": config_to_json(config)}, ArrayTable())
    assert config_from_json(header["config"]) == config
    with pytest.raises(SnapshotError, match="unknown fields"):
        config_from_json({**config_to_json(config), "surprise": 1})


def test_an_unknown_format_version_is_refused() -> None:
    blob = pack({"x": 1}, ArrayTable())
    assert blob.startswith(MAGIC)
    newer = blob[:8] + struct.pack("<H", FORMAT_VERSION + 1) + blob[10:]
    with pytest.raises(SnapshotError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        unpack(newer)


def test_what_is_not_a_snapshot_is_refused() -> None:
    arrays = ArrayTable()
    arrays.add(np.arange(10, dtype=np.float32))
    blob = pack({"a": {"array": 0}}, arrays)
    with pytest.raises(SnapshotError, match="magic"):
        unpack(b"PK\x03\x04" + blob[4:])
    with pytest.raises(SnapshotError):
        unpack(blob[:-8])  # the array cut short
    with pytest.raises(SnapshotError, match="after its last array"):
        unpack(blob + b"\0")
    with pytest.raises(SnapshotError, match="too short"):
        unpack(blob[:5])
    with pytest.raises(SnapshotError, match="bad array reference"):
        unpack(blob)[1].get({"array": 3})


def test_a_pickled_object_array_is_never_loaded() -> None:
    # A hand-made snapshot whose array is an object array (np.save with pickle): reading it must
    # refuse, not unpickle (the store is shared; unpickling runs code).
    header = b'{"array_count":1}'
    payload = io.BytesIO()
    np.lib.format.write_array(payload, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    blob = struct.pack("<8sHI", MAGIC, FORMAT_VERSION, len(header)) + header + payload.getvalue()
    with pytest.raises(SnapshotError, match="unreadable"):
        unpack(blob)
