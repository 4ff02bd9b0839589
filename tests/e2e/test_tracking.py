"""Track end to end on the real Crossing sequence: real orchestrator, real Triton, the SAM 2
contract models (stand-ins: the masks carry no learned meaning, so these tests check the
service's behaviour — ordering, sizes, state, isolation, errors — not tracking accuracy)."""

from __future__ import annotations

import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from pycocotools import mask as coco_mask

from framewise.v1 import common_pb2, tracking_service_pb2 as pb, tracking_service_pb2_grpc
from tests.conftest import SAM2_TEST_IMAGE_SIZE, SESSION_IDLE_TTL_S, Orchestrator


def crossing(assets: Path) -> tuple[list[bytes], list[tuple[float, float, float, float]]]:
    folder = assets / "sequences" / "Crossing"
    frames = [p.read_bytes() for p in sorted((folder / "img").glob("*.jpg"))]
    boxes = []
    for line in (folder / "groundtruth_rect.txt").read_text().split("\n"):
        if line.strip():
            x, y, w, h = (float(v) for v in re.split(r"[\t,]", line.strip()))
            boxes.append((x, y, x + w, y + h))
    return frames, boxes


def frame_request(data: bytes, index: int = 0, box=None, object_id: int = 1, remove=()) -> pb.TrackRequest:  # noqa: ANN001
    frame = pb.TrackFrame(frame_index=index, image=common_pb2.Image(encoded=data), remove_object_ids=list(remove))
    if box is not None:
        x1, y1, x2, y2 = box
        frame.prompts.add(object_id=object_id, box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2))
    return pb.TrackRequest(frame=frame)


def open_request(resume: str = "", keep: bool = False) -> pb.TrackRequest:
    return pb.TrackRequest(open=pb.OpenSession(resume_session_id=resume, keep_on_close=keep))


def track(stub, requests) -> tuple[pb.SessionOpened, list[pb.FrameResult]]:  # noqa: ANN001
    responses = list(stub.Track(iter(requests), timeout=300))
    assert responses[0].WhichOneof("message") == "session"
    assert all(r.WhichOneof("message") == "frame" for r in responses[1:])
    return responses[0].session, [r.frame for r in responses[1:]]


def summary(results: list[pb.FrameResult]) -> list[tuple]:
    return [
        (r.frame_index, o.object_id, o.mask.counts, round(o.predicted_iou, 6), o.present, o.candidate_index, o.kalman_selected)
        for r in results
        for o in r.objects
    ]


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> tracking_service_pb2_grpc.TrackingServiceStub:
    return tracking_service_pb2_grpc.TrackingServiceStub(channel)


@pytest.fixture(scope="module")
def sequence(assets: Path):  # noqa: ANN201
    return crossing(assets)


@pytest.fixture(scope="module")
def solo_run(stub, sequence):  # noqa: ANN001, ANN201
    frames, boxes = sequence
    requests = [open_request()] + [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames)]
    return track(stub, requests)


def test_one_ordered_response_per_frame_with_full_size_masks(solo_run, sequence) -> None:  # noqa: ANN001
    opened, results = solo_run
    frames, boxes = sequence
    assert opened.session_id and not opened.resumed and opened.next_frame_index == 0
    assert all(m.stand_in for m in opened.models), "the SAM 2 parts are stand-ins on this machine and say so"
    assert [r.frame_index for r in results] == list(range(len(frames)))
    for result in results:
        (obj,) = result.objects
        assert obj.object_id == 1
        assert (obj.mask.height, obj.mask.width) == (240, 360)
        decoded = coco_mask.decode({"size": [obj.mask.height, obj.mask.width], "counts": obj.mask.counts})
        assert decoded.shape == (240, 360)
        if decoded.any():
            ys, xs = np.nonzero(decoded)
            assert (obj.box.x1, obj.box.y1, obj.box.x2, obj.box.y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert result.triton_bytes > 0 and result.timings.total_ms > 0
    # The prompt frame answers with the single-mask output for a box prompt.
    assert results[0].objects[0].candidate_index == 0
    assert all(1 <= r.objects[0].candidate_index <= 3 for r in results[1:])
    # The box prompt on frame 0 is where the first mask is (the contract decoder honours boxes).
    first = results[0].objects[0].box
    gx1, gy1, gx2, gy2 = boxes[0]
    assert gx1 - 4 <= first.x1 and first.x2 <= gx2 + 4 and gy1 - 4 <= first.y1 and first.y2 <= gy2 + 4


def test_memory_bank_stays_bounded(stub, sequence, orchestrator: Orchestrator) -> None:  # noqa: ANN001
    frames, boxes = sequence
    peak = 0
    requests = [open_request()] + [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames[:40])]
    for _response in stub.Track(iter(requests), timeout=300):
        text = httpx.get(orchestrator.metrics_url, timeout=5).text
        # The largest session's bank (one session here); no series names a session id.
        values = [float(v) for v in re.findall(r"^framewise_tracking_session_bytes_max (\S+)$", text, re.MULTILINE)]
        assert "session=" not in text
        peak = max([peak, *values])
    # 1 prompt memory + 6 recent memories of [64, 16, 16] FP16 (S = 256), + 16 pointers of 256 FP32.
    bound = 7 * 64 * 16 * 16 * 2 + 16 * 256 * 4
    assert 0 < peak <= bound


def test_resumed_session_continues_from_its_state(stub, sequence, solo_run) -> None:  # noqa: ANN001
    frames, boxes = sequence
    half = len(frames) // 2
    first = [open_request(keep=True)] + [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames[:half])]
    opened, results_a = track(stub, first)
    resumed, results_b = track(stub, [open_request(resume=opened.session_id)] + [frame_request(f) for f in frames[half:]])
    assert resumed.resumed and resumed.session_id == opened.session_id
    assert resumed.next_frame_index == half and list(resumed.object_ids) == [1]
    assert summary(results_a + results_b) == summary(solo_run[1])


def test_concurrent_sessions_do_not_influence_each_other(stub, sequence, solo_run) -> None:  # noqa: ANN001
    frames, boxes = sequence
    requests = [open_request()] + [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames)]
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: track(stub, requests), range(2)))
    assert runs[0][0].session_id != runs[1][0].session_id
    for _, results in runs:
        assert summary(results) == summary(solo_run[1])


def test_two_objects_and_removal(stub, sequence) -> None:  # noqa: ANN001
    frames, boxes = sequence
    x1, y1, x2, y2 = boxes[0]
    requests = [open_request(), frame_request(frames[0], box=boxes[0], object_id=1)]
    two = frame_request(frames[1])
    two.frame.prompts.add(object_id=7, box=common_pb2.BoundingBox(x1=10, y1=10, x2=60, y2=80))
    requests += [two, frame_request(frames[2]), frame_request(frames[3], remove=[1])]
    _, results = track(stub, requests)
    assert [[o.object_id for o in r.objects] for r in results] == [[1], [1, 7], [1, 7], [7]]
    assert results[1].objects[1].candidate_index == 0  # object 7's prompt frame


# Boxes of five objects on Crossing's first frame (360 x 240): the walker and four other places.
OTHER_BOXES = [(10, 10, 60, 80), (200, 40, 260, 120), (100, 150, 180, 230), (280, 20, 350, 100)]


def test_a_frames_objects_share_batched_calls_and_each_tracks_as_if_alone(stub, sequence, triton) -> None:  # noqa: ANN001
    """Five objects from frame 0 and a sixth from frame 3: each object's results are exactly those
    of a session tracking it alone, while the per-object parts ran as batched calls (rows of one
    call share the memory and pointer counts; at most MAX_OBJECTS_PER_CALL rows a call)."""
    from server.sam2.contract import MAX_OBJECTS_PER_CALL

    frames, boxes = sequence
    frames = frames[:8]
    starts = [boxes[0], *OTHER_BOXES]

    def prompted(request: pb.TrackRequest, object_id: int, box) -> pb.TrackRequest:  # noqa: ANN001
        x1, y1, x2, y2 = box
        request.frame.prompts.add(object_id=object_id, box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2))
        return request

    stats = triton_grpc.InferenceServerClient(triton.url)

    def counts(model: str) -> tuple[int, int]:
        model_stats = stats.get_inference_statistics(model).model_stats[0]
        return model_stats.inference_count, model_stats.execution_count

    models = ("sam2_track_step", "sam2_memory_encoder", "sam2_mask_decoder")
    before = {m: counts(m) for m in models}
    first = frame_request(frames[0])
    for object_id, box in enumerate(starts, start=1):
        prompted(first, object_id, box)
    requests = [open_request(), first]
    requests += [prompted(frame_request(f), 6, (150, 60, 210, 140)) if i == 3 else frame_request(f)
                 for i, f in enumerate(frames[1:], start=1)]
    _, together = track(stub, requests)
    after = {m: counts(m) for m in models}
    assert [[o.object_id for o in r.objects] for r in together] == [[1, 2, 3, 4, 5]] * 3 + [[1, 2, 3, 4, 5, 6]] * 5

    for object_id, box in enumerate(starts, start=1):
        alone = [open_request(), prompted(frame_request(frames[0]), object_id, box)] + [frame_request(f) for f in frames[1:]]
        _, results = track(stub, alone)
        mine = [pb.FrameResult(frame_index=r.frame_index, objects=[o for o in r.objects if o.object_id == object_id])
                for r in together]
        assert summary(mine) == summary(results), object_id
    assert any(o.present for r in together for o in r.objects if o.object_id == 6)

    # Followed object-frames: objects 1-5 on frames 1-7, object 6 on frames 4-7; one row each.
    followed = 5 * 7 + 4
    rows, calls = (after["sam2_track_step"][k] - before["sam2_track_step"][k] for k in (0, 1))
    assert rows == followed
    # Without batching, one call per row. With it, per frame at least ceil(5 / MAX_OBJECTS_PER_CALL)
    # calls for objects 1-5, plus one for object 6 while its memory count differs from theirs.
    per_frame = -(-5 // MAX_OBJECTS_PER_CALL)
    assert 7 * per_frame <= calls <= 7 * per_frame + 4 < rows
    # Every object's memory, each frame: 5 x 3 + 6 x 5 rows in a call or two per frame.
    rows, calls = (after["sam2_memory_encoder"][k] - before["sam2_memory_encoder"][k] for k in (0, 1))
    assert rows == 5 * 3 + 6 * 5 and calls <= 8 * -(-6 // MAX_OBJECTS_PER_CALL)
    # Prompt frames go to the decoder alone, the five boxes of frame 0 in rows of one batch.
    rows, calls = (after["sam2_mask_decoder"][k] - before["sam2_mask_decoder"][k] for k in (0, 1))
    assert rows >= 6 and calls < rows


def _error(stub, requests) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Track(iter(requests), timeout=120))
    return info.value


def _with_points(request: pb.TrackRequest, count: int) -> pb.TrackRequest:
    point = common_pb2.PointPrompt(point=common_pb2.Point(x=100, y=100), label=common_pb2.POINT_LABEL_POSITIVE)
    request.frame.prompts.add(object_id=1, points=[point] * count)
    return request


def _open_with(**options: float) -> pb.TrackRequest:
    return pb.TrackRequest(open=pb.OpenSession(options=pb.TrackerOptions(**options)))


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("no prompt on the first frame", grpc.StatusCode.FAILED_PRECONDITION, "nothing to track"),
        ("zero-area box", grpc.StatusCode.INVALID_ARGUMENT, "zero or negative area"),
        ("box outside the frame", grpc.StatusCode.INVALID_ARGUMENT, "not inside the 360x240 frame"),
        ("point outside the frame", grpc.StatusCode.INVALID_ARGUMENT, "outside the 360x240 frame"),
        ("unknown object removed", grpc.StatusCode.NOT_FOUND, "cannot remove object 9"),
        ("object removed twice", grpc.StatusCode.INVALID_ARGUMENT, "lists an object twice"),
        ("frame size change", grpc.StatusCode.INVALID_ARGUMENT, "frame size changed from 360x240"),
        ("corrupt frame", grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
        ("frame out of order", grpc.StatusCode.INVALID_ARGUMENT, "out of order"),
        ("frame before open", grpc.StatusCode.INVALID_ARGUMENT, "first message"),
        ("NaN box", grpc.StatusCode.INVALID_ARGUMENT, "is not made of finite numbers"),
        ("too many points", grpc.StatusCode.INVALID_ARGUMENT, "65 points in one prompt; at most 64"),
        ("infinite tracker option", grpc.StatusCode.INVALID_ARGUMENT, "memory_bank_iou_threshold must be a finite number"),
        ("tracker option out of range", grpc.StatusCode.INVALID_ARGUMENT, "stable_ious_threshold must be in [-1, 1]"),
        ("oversized session id", grpc.StatusCode.INVALID_ARGUMENT, "open.resume_session_id is 5000 characters long"),
        ("unknown session id", grpc.StatusCode.NOT_FOUND, "... (250 characters) is not held by replica"),
    ],
)
def test_bad_input_keeps_the_session(stub, sequence, assets: Path, case: str, code: grpc.StatusCode, words: str) -> None:  # noqa: ANN001
    frames, boxes = sequence
    good = [open_request(keep=True), frame_request(frames[0], box=boxes[0])]
    bad = {
        "no prompt on the first frame": [open_request(), frame_request(frames[0])],
        "zero-area box": good[:1] + [frame_request(frames[0], box=(10, 10, 10, 50))],
        "box outside the frame": good[:1] + [frame_request(frames[0], box=(300, 100, 400, 200))],
        "point outside the frame": None,
        "unknown object removed": good + [frame_request(frames[1], remove=[9])],
        "object removed twice": good + [frame_request(frames[1], remove=[1, 1])],
        "frame size change": good + [frame_request((assets / "images" / "bus.jpg").read_bytes())],
        "corrupt frame": good + [frame_request(frames[1][: len(frames[1]) // 2])],
        "frame out of order": good + [frame_request(frames[1], index=5)],
        "frame before open": [frame_request(frames[0], box=boxes[0])],
        "NaN box": good[:1] + [frame_request(frames[0], box=(math.nan, 10, 50, 50))],
        "too many points": good[:1] + [_with_points(frame_request(frames[0]), 65)],
        "infinite tracker option": [_open_with(memory_bank_iou_threshold=math.inf), frame_request(frames[0], box=boxes[0])],
        "tracker option out of range": [_open_with(stable_ious_threshold=3.0), frame_request(frames[0], box=boxes[0])],
        "oversized session id": [open_request(resume="s" * 5000)],
        "unknown session id": [open_request(resume="s" * 250)],
    }[case]
    if bad is None:
        request = frame_request(frames[0])
        request.frame.prompts.add(object_id=1, points=[common_pb2.PointPrompt(point=common_pb2.Point(x=500, y=10), label=common_pb2.POINT_LABEL_POSITIVE)])
        bad = good[:1] + [request]
    error = _error(stub, bad)
    assert error.code() == code, error.details()
    assert words in error.details()
    # The server keeps serving: a fresh session works after any error (resuming the damaged
    # session is test_session_survives_a_bad_frame).
    _, results = track(stub, [open_request(), frame_request(frames[0], box=boxes[0]), frame_request(frames[1])])
    assert [r.frame_index for r in results] == [0, 1]


def test_session_survives_a_bad_frame(stub, sequence) -> None:  # noqa: ANN001
    frames, boxes = sequence
    responses = stub.Track(
        iter([open_request(keep=True), frame_request(frames[0], box=boxes[0]), frame_request(frames[1][:500])]), timeout=120
    )
    session_id = next(responses).session.session_id
    assert next(responses).frame.frame_index == 0
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    opened, results = track(stub, [open_request(resume=session_id), frame_request(frames[1]), frame_request(frames[2])])
    assert opened.resumed and opened.next_frame_index == 1
    assert [r.frame_index for r in results] == [1, 2]


def test_idle_sessions_expire(stub, sequence) -> None:  # noqa: ANN001
    frames, boxes = sequence
    opened, _ = track(stub, [open_request(keep=True), frame_request(frames[0], box=boxes[0])])
    time.sleep(SESSION_IDLE_TTL_S + 1.5)
    error = _error(stub, [open_request(resume=opened.session_id)])
    assert error.code() == grpc.StatusCode.NOT_FOUND and "expired" in error.details()


def test_released_session_cannot_be_resumed(stub, sequence) -> None:  # noqa: ANN001
    frames, boxes = sequence
    opened, _ = track(stub, [open_request(), frame_request(frames[0], box=boxes[0])])  # no keep_on_close
    error = _error(stub, [open_request(resume=opened.session_id)])
    assert error.code() == grpc.StatusCode.NOT_FOUND


def _sessions_held(orchestrator: Orchestrator) -> float:
    match = re.search(r"^framewise_tracking_sessions (\S+)", httpx.get(orchestrator.metrics_url, timeout=5).text, re.M)
    return float(match.group(1)) if match else -1


def test_session_limit_answers_resource_exhausted(stub, sequence, orchestrator: Orchestrator) -> None:  # noqa: ANN001
    import threading

    from tests.conftest import MAX_TRACKING_SESSIONS, wait_until

    wait_until(lambda: _sessions_held(orchestrator) == 0, SESSION_IDLE_TTL_S + 10, "earlier sessions to expire")
    release = threading.Event()

    def held_open():  # noqa: ANN202 - a request stream that stays open until released
        yield open_request()
        release.wait(60)

    streams = [stub.Track(held_open(), timeout=120) for _ in range(MAX_TRACKING_SESSIONS)]
    try:
        opened = [next(s).session.session_id for s in streams]
        assert len(set(opened)) == MAX_TRACKING_SESSIONS
        error = _error(stub, [open_request()])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"all {MAX_TRACKING_SESSIONS} tracking sessions are in use" in error.details()
    finally:
        release.set()
        for s in streams:
            list(s)
    # Streams that ended normally released their sessions: there is room again.
    wait_until(lambda: _sessions_held(orchestrator) == 0, 10, "sessions to be released")
    _, results = track(stub, [open_request(), frame_request(sequence[0][0], box=sequence[1][0])])
    assert len(results) == 1


def test_correction_prompt_makes_a_conditioning_frame(stub, sequence) -> None:  # noqa: ANN001
    frames, boxes = sequence
    requests = [open_request()] + [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames[:8])]
    requests[6] = frame_request(frames[5], box=boxes[5])  # frame 5: a corrected box for object 1
    _, results = track(stub, requests)
    assert [r.objects[0].candidate_index == 0 for r in results] == [True, False, False, False, False, True, False, False]
    corrected = results[5].objects[0].box
    gx1, gy1, gx2, gy2 = boxes[5]
    assert gx1 - 4 <= corrected.x1 and corrected.x2 <= gx2 + 4 and gy1 - 4 <= corrected.y1 and corrected.y2 <= gy2 + 4


def test_shared_memory_references_change_nothing(tmp_path: Path, triton, sequence, solo_run) -> None:  # noqa: ANN001
    # The shared orchestrator passes feature maps between models by reference in shared memory;
    # one sending every tensor inside gRPC messages must track identically.
    from tests.conftest import health_status, start_orchestrator, stop_process, wait_until

    frames, boxes = sequence
    plain = start_orchestrator(tmp_path, ["--triton-url", triton.url, "--triton-shm", "off"], name="plain")
    try:
        with grpc.insecure_channel(plain.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            wait_until(lambda: health_status(channel) == 1, 60, "the gRPC-only orchestrator to serve")
            stub = tracking_service_pb2_grpc.TrackingServiceStub(channel)
            requests = [open_request()] + [frame_request(f, box=boxes[0] if i == 0 else None) for i, f in enumerate(frames[:25])]
            _, results = track(stub, requests)
    finally:
        stop_process(plain.process)
    assert summary(results) == summary(solo_run[1][:25])
    # Without shared memory more crosses: the frame step's vision features come back and go out
    # again to the memory encoder, and the outputs come back inside messages. The high-resolution
    # features never do: the step ensemble passes them from encoder to decoder inside Triton.
    shm_bytes, grpc_bytes = solo_run[1][24].triton_bytes, results[-1].triton_bytes
    vision_feat_bytes = 256 * (SAM2_TEST_IMAGE_SIZE // 16) ** 2 * 4
    high_res_bytes = (32 * (SAM2_TEST_IMAGE_SIZE // 4) ** 2 + 64 * (SAM2_TEST_IMAGE_SIZE // 8) ** 2) * 4
    assert shm_bytes + 2 * vision_feat_bytes <= grpc_bytes < shm_bytes + 2 * vision_feat_bytes + high_res_bytes
