"""InferenceRunner against the real test Triton: shared memory gives the same outputs as gRPC,
falls back when slots run out, and survives Triton forgetting its registration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.triton.client import TritonClient
from server.triton.runner import InferenceRunner
from server.vision.letterbox import letterbox


def _frame(assets: Path) -> np.ndarray:
    rgb = cv2.cvtColor(cv2.imread(str(assets / "images" / "bus.jpg")), cv2.COLOR_BGR2RGB)
    return letterbox(rgb, (640, 640), 114)[0][None]


async def test_shared_memory_matches_grpc_and_recovers(triton, assets: Path) -> None:  # noqa: ANN001
    client = TritonClient(triton.url)
    metrics = Metrics(CollectorRegistry())
    spec = await client.model_spec("yolov8")
    frame = _frame(assets)
    copy = lambda outputs: np.array(outputs["output0"])  # noqa: E731 - copy out of the slot

    plain = InferenceRunner(client, metrics)
    shared = InferenceRunner(client, metrics, shm_slots_per_model=1)
    try:
        by_grpc = await plain.run(spec, {"images": frame}, ["output0"], copy)
        by_shm = await shared.run(spec, {"images": frame}, ["output0"], copy)
        assert not by_grpc.shared_memory and by_shm.shared_memory
        np.testing.assert_array_equal(by_shm.value, by_grpc.value)

        # One slot, two concurrent requests: the second travels over gRPC, both are right.
        both = await asyncio.gather(*(shared.run(spec, {"images": frame}, ["output0"], copy) for _ in range(2)))
        assert sorted(r.shared_memory for r in both) == [False, True]
        for result in both:
            np.testing.assert_array_equal(result.value, by_grpc.value)

        # Triton forgets the region (as after a restart): the runner registers it again.
        ((_, pool),) = shared._pools.values()
        assert pool is not None
        await client.unregister_shared_memory(pool.region)
        again = await shared.run(spec, {"images": frame}, ["output0"], copy)
        assert again.shared_memory
        np.testing.assert_array_equal(again.value, by_grpc.value)
    finally:
        await shared.close()
        await client.close()
    assert not Path(f"/dev/shm/{pool.region}").exists(), "the region is unlinked on close"
