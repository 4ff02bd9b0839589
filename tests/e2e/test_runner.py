"""InferenceRunner against the real test Triton: shared memory gives the same outputs as gRPC,
falls back when slots run out, and survives Triton forgetting its registration."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.triton.client import TritonClient
from server.triton.runner import InferenceRunner, Stacked
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


async def test_stacked_parts_already_in_the_slot_are_not_written_again(triton) -> None:  # noqa: ANN001
    """Memory attention for two objects with a Stacked memories input (2 objects x N memories): a
    second request whose parts are partly the same arrays at the same rows writes only the new
    ones, and still gives exactly what the same request over gRPC gives; a part replaced by another
    array, or moved to another row, is written."""
    from server.sam2 import contract as sam2

    client = TritonClient(triton.url)
    metrics = Metrics(CollectorRegistry())
    specs = {name: await client.model_spec(name) for name in sam2.TRACKING_MODELS}
    contract = sam2.Sam2Contract.from_specs(specs)
    spec = specs[sam2.MEMORY_ATTENTION]
    limits = contract.shm_max_shapes(sam2.MEMORY_ATTENTION)
    rng = np.random.default_rng(0)
    feat = rng.standard_normal((2, *spec.input("vision_feat").shape[1:]), dtype=np.float32)
    memory = lambda: rng.standard_normal((1, *spec.input("memory_feats").shape[2:])).astype(np.float16)  # noqa: E731
    memories = [memory() for _ in range(8)]  # objects 0 and 1, 4 memories each
    pointers = rng.standard_normal((2, 3, spec.input("obj_ptrs").shape[-1])).astype(np.float32)

    def inputs(parts: list[np.ndarray]) -> dict:
        per_object = len(parts) // 2
        return {"vision_feat": feat, "memory_feats": Stacked(parts, (2, per_object)),
                "memory_tpos": np.arange(len(parts), dtype=np.int32).reshape(2, per_object) % 7,
                "obj_ptrs": pointers, "obj_ptr_tdiff": np.arange(1, 7, dtype=np.int32).reshape(2, 3)}

    plain = InferenceRunner(client, metrics)
    shared = InferenceRunner(client, metrics, shm_slots_per_model=1)
    try:
        changed = [memories[0], memory(), *memories[2:]]
        three_each = changed[:3] + changed[4:7]  # object 1's memories move up a row
        # (parts, how many of them the slot does not hold yet): all new; one replaced; the same
        # again; three each (rows 3..5 now hold other arrays); four each again (row 1 was
        # replaced, rows 3..5 moved; rows 6 and 7 still hold theirs).
        for parts, new_parts in ((memories, 8), (changed, 1), (changed, 0), (three_each, 3), (memories, 4)):
            async with plain.hold(spec, inputs(parts), ["conditioned_feat"]) as by_grpc:
                expected = np.array(by_grpc.array("conditioned_feat"))
            async with shared.hold(spec, inputs(parts), ["conditioned_feat"], max_shapes=limits) as by_shm:
                assert by_shm.shared_memory
                np.testing.assert_array_equal(np.array(by_shm.array("conditioned_feat")), expected)
                written = by_shm.bytes_moved - by_shm.outputs["conditioned_feat"].nbytes
            small = feat.nbytes + pointers.nbytes + 4 * len(parts) + 4 * 6  # + memory_tpos, obj_ptr_tdiff
            assert written == small + new_parts * memories[0].nbytes, (written, new_parts)
    finally:
        await shared.close()
        await plain.close()
        await client.close()


async def test_a_fill_input_is_computed_in_place_and_matches_an_array(triton) -> None:  # noqa: ANN001
    """A Fill (the tracker's frame resized to S x S) gives the encoder what the resized array gives,
    through shared memory and through gRPC."""
    from server.sam2 import contract as sam2
    from server.sam2.frame_calls import ResizedFrame

    client = TritonClient(triton.url)
    metrics = Metrics(CollectorRegistry())
    spec = await client.model_spec(sam2.IMAGE_ENCODER)
    size = spec.input("image").shape[-2]
    outputs = ["vision_feat"]
    copy = lambda o: np.array(o["vision_feat"])  # noqa: E731
    plain = InferenceRunner(client, metrics)
    shared = InferenceRunner(client, metrics, shm_slots_per_model=1)
    try:
        # A small frame is resized on the event loop, a large one (offload) in a worker thread.
        for height, width in ((37, 53), (720, 1280)):
            rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = ResizedFrame(rgb, size)
            assert frame.offload is (height * width > 640 * 480)
            resized = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR)[None]
            expected = (await plain.run(spec, {"image": resized}, outputs, copy)).value
            for runner in (plain, shared):
                result = await runner.run(spec, {"image": frame}, outputs, copy)
                assert result.shared_memory is (runner is shared)
                np.testing.assert_array_equal(result.value, expected)
    finally:
        await shared.close()
        await plain.close()
        await client.close()


def test_shm_requests_are_built_once_per_place_and_match_tritonclient() -> None:
    """The cached shared-memory request carries exactly what tritonclient's set_shared_memory
    writes, and a slot used again with the same shapes reuses the same bytes."""
    from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2

    from server.triton.client import ShmRequests
    from server.triton.shm import ShmRef

    buffer = memoryview(bytearray(4096))
    image = ShmRef("region-a", 0, (1, 8, 8, 3), "UINT8", buffer)
    memories = ShmRef("region-a", 256, (2, 4), "FP16", buffer)
    masks = ShmRef("region-b", 1024, (1, 4, 2, 2), "FP32", buffer)
    requests = ShmRequests(capacity=2)
    first = requests.get("m", {"image": image, "memory_feats": memories}, {"masks": masks})
    assert requests.get("m", {"image": image, "memory_feats": memories}, {"masks": masks}) is first
    fewer = ShmRef("region-a", 256, (1, 4), "FP16", buffer)
    assert requests.get("m", {"image": image, "memory_feats": fewer}, {"masks": masks}) != first

    parsed = service_pb2.ModelInferRequest.FromString(first)
    expected = service_pb2.ModelInferRequest(model_name="m")
    for name, ref in (("image", image), ("memory_feats", memories)):
        tensor = InferInput(name, list(ref.shape), ref.datatype)
        tensor.set_shared_memory(ref.region, ref.nbytes, ref.offset)
        expected.inputs.append(tensor._get_tensor())
    output = InferRequestedOutput("masks")
    output.set_shared_memory(masks.region, masks.nbytes, masks.offset)
    expected.outputs.append(output._get_tensor())
    assert parsed == expected


async def test_concurrent_shm_requests_on_one_stream_get_their_own_responses(triton) -> None:  # noqa: ANN001
    """Shared-memory requests share one ModelStreamInfer stream, matched to responses by id: 6
    concurrent memory-encoder calls with different inputs each read exactly what the same call
    over plain gRPC gives; a request that times out fails alone, and the stream keeps serving."""
    from server.errors import DeadlineExceeded
    from server.sam2 import contract as sam2

    client = TritonClient(triton.url)
    metrics = Metrics(CollectorRegistry())
    spec = await client.model_spec(sam2.MEMORY_ENCODER)
    rng = np.random.default_rng(3)

    def inputs() -> dict:
        return {name: rng.standard_normal((1, *spec.input(name).shape[1:])).astype(np.float32)
                for name in ("vision_feat", "mask_logits", "object_score_logits")}

    requests = [inputs() for _ in range(6)]
    plain = InferenceRunner(client, metrics)
    shared = InferenceRunner(client, metrics, shm_slots_per_model=6)

    async def encode(runner: InferenceRunner, request: dict, timeout_s: float | None = None) -> np.ndarray:
        async with runner.hold(spec, request, ["maskmem_feat"], timeout_s=timeout_s) as held:
            return np.array(held.array("maskmem_feat"))

    try:
        expected = [await encode(plain, r) for r in requests]
        got = await asyncio.gather(*(encode(shared, r) for r in requests))
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(DeadlineExceeded):
            await encode(shared, requests[0], timeout_s=1e-4)
        np.testing.assert_array_equal(await encode(shared, requests[1]), expected[1])
    finally:
        await shared.close()
        await plain.close()
        await client.close()


def test_the_request_id_is_appended_to_cached_request_bytes() -> None:
    from tritonclient.grpc import service_pb2

    from server.triton.stream import _id_field

    request = service_pb2.ModelInferRequest(model_name="m", id="old")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    parsed = service_pb2.ModelInferRequest.FromString(request.SerializeToString() + _id_field("1234"))
    assert parsed.id == "1234" and parsed.model_name == "m" and parsed.inputs[0].shape == [1, 2]


async def test_idle_slots_give_their_pages_back_and_later_requests_stay_right(triton) -> None:  # noqa: ANN001
    """A slot left free for shm_idle_release_s gives its pages back (the region's allocated bytes
    fall, the metric counts them) and forgets the rows it held: the next request writes every
    part again and gets what gRPC gets."""
    from server.sam2 import contract as sam2

    client = TritonClient(triton.url)
    metrics = Metrics(CollectorRegistry())
    specs = {name: await client.model_spec(name) for name in sam2.TRACKING_MODELS}
    spec = specs[sam2.MEMORY_ATTENTION]
    limits = sam2.Sam2Contract.from_specs(specs).shm_max_shapes(sam2.MEMORY_ATTENTION)
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((1, *spec.input("memory_feats").shape[2:])).astype(np.float16) for _ in range(4)]
    inputs = {"vision_feat": rng.standard_normal((1, *spec.input("vision_feat").shape[1:]), dtype=np.float32),
              "memory_feats": Stacked(parts, (1, 4)), "memory_tpos": np.arange(4, dtype=np.int32)[None],
              "obj_ptrs": rng.standard_normal((1, 2, spec.input("obj_ptrs").shape[-1])).astype(np.float32),
              "obj_ptr_tdiff": np.array([[1, 2]], dtype=np.int32)}
    released = lambda: metrics.registry.get_sample_value(  # noqa: E731
        "framewise_triton_shm_released_bytes_total", {"model": spec.name}) or 0.0

    plain = InferenceRunner(client, metrics)
    shared = InferenceRunner(client, metrics, shm_slots_per_model=1, shm_idle_release_s=0.2)
    try:
        async with plain.hold(spec, inputs, ["conditioned_feat"]) as by_grpc:
            expected = np.array(by_grpc.array("conditioned_feat"))
        async with shared.hold(spec, inputs, ["conditioned_feat"], max_shapes=limits) as first:
            np.testing.assert_array_equal(np.array(first.array("conditioned_feat")), expected)
        ((_, pool),) = shared._pools.values()
        used = pool.allocated_bytes()
        assert released() == 0
        for _ in range(50):  # the timer fires after 0.2 s
            await asyncio.sleep(0.1)
            if released():
                break
        assert released() > 0
        assert pool.allocated_bytes() == used - released() < used / 4, "the written pages went back"
        async with shared.hold(spec, inputs, ["conditioned_feat"], max_shapes=limits) as again:
            np.testing.assert_array_equal(np.array(again.array("conditioned_feat")), expected)
            written = again.bytes_moved - again.outputs["conditioned_feat"].nbytes
        assert written >= sum(p.nbytes for p in parts), "every memory row is written again"
    finally:
        await shared.close()
        await plain.close()
        await client.close()
