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
        assert slot.outputs["output0"].view.dtype == np.float32
        assert pool.fits({"images": np.zeros((1, 640, 640, 3), np.uint8)})
        assert not pool.fits({"images": np.zeros((2, 640, 640, 3), np.uint8)})  # a batch of 2 goes over gRPC
        assert pool.acquire() is not None and pool.acquire() is None  # 2 slots
    finally:
        pool.close()
    assert not Path(f"/dev/shm/{pool.region}").exists()


def test_a_dynamic_first_dimension_of_a_non_batching_model_is_not_a_batch() -> None:
    # memory attention takes N memories with max_batch_size 0: no fixed slot can hold them.
    assert not ShmSlotPool.supports((MEMORIES,), batched=False)
    assert ShmSlotPool.supports((TensorSpec("vision_feat", "FP32", (1, 256, 64, 64)),), batched=False)
