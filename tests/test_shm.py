"""Shared-memory slot layout, without Triton: which models can use slots, and their shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.triton.model_spec import TensorSpec
from server.triton.shm import ShmSlotPool

IMAGE = TensorSpec("images", "UINT8", (-1, 640, 640, 3))
HEAD = TensorSpec("output0", "FP32", (-1, 84, 8400))
MEMORIES = TensorSpec("memory_feats", "FP16", (-1, 64, 64, 64))  # a non-batching model: -1 is N


def test_batching_models_get_slots_of_one() -> None:
    assert ShmSlotPool.supports((IMAGE, HEAD), batched=True)
    pool = ShmSlotPool("yolov8", (IMAGE,), (HEAD,), 2, batched=True)
    try:
        slot = pool.acquire()
        assert slot is not None and slot.inputs["images"].shape == (1, 640, 640, 3)
        assert slot.outputs["output0"].view().dtype == np.float32
        assert pool.fits({"images": np.zeros((1, 640, 640, 3), np.uint8)})
        assert not pool.fits({"images": np.zeros((2, 640, 640, 3), np.uint8)})  # a batch of 2 goes over gRPC
        assert pool.acquire() is not None and pool.acquire() is None  # 2 slots
    finally:
        pool.close()
    assert not Path(f"/dev/shm/{pool.region}").exists()


def test_a_dynamic_first_dimension_of_a_non_batching_model_is_not_a_batch() -> None:
    # memory attention takes N memories with max_batch_size 0: without a limit no slot holds them.
    assert not ShmSlotPool.supports((MEMORIES,), batched=False)
    assert ShmSlotPool.supports((TensorSpec("vision_feat", "FP32", (1, 256, 64, 64)),), batched=False)


def test_dynamic_dimensions_get_room_for_their_limit() -> None:
    limits = {"memory_feats": (7, 64, 8, 8)}
    small = TensorSpec("memory_feats", "FP16", (-1, 64, 8, 8))
    assert ShmSlotPool.supports((small,), batched=False, max_shapes=limits)
    pool = ShmSlotPool("sam2_memory_attention", (small,), (), 1, batched=False, max_shapes=limits)
    try:
        three = np.arange(3 * 64 * 8 * 8, dtype=np.float16).reshape(3, 64, 8, 8)
        assert pool.fits({"memory_feats": three})
        assert not pool.fits({"memory_feats": np.zeros((8, 64, 8, 8), np.float16)})  # over the limit: gRPC
        assert not pool.fits({"memory_feats": three.astype(np.float32)})  # wrong dtype
        slot = pool.acquire()
        tensor = slot.inputs["memory_feats"]
        tensor.view(three.shape)[...] = three
        np.testing.assert_array_equal(tensor.view(three.shape), three)
        assert tensor.nbytes_for(three.shape) == three.nbytes < tensor.capacity
    finally:
        pool.close()
