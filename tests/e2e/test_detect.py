"""Detection end to end: real orchestrator -> real Triton -> real YOLOv8n weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import re

import cv2
import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc

# People as a person would draw them (read off the photos on a 100 px grid), x1, y1, x2, y2.
BUS_PEOPLE = [
    (50, 395, 245, 900),  # man in the fur coat
    (222, 405, 345, 860),  # man in black, centre
    (665, 370, 810, 880),  # person walking out at the right edge
    (0, 545, 65, 870),  # partly visible person at the left edge
]
ZIDANE_PEOPLE = [
    (115, 195, 1140, 720),  # Zidane, pointing arm included
    (750, 40, 1140, 720),  # Ancelotti
]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def boxes(response: vision_service_pb2.DetectResponse) -> list[tuple[float, float, float, float]]:
    return [(d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in response.detections]


def assert_matches(found: list[tuple[float, ...]], expected: list[tuple[float, ...]], min_iou: float = 0.7) -> None:
    """One detection per expected box, each overlapping it by at least min_iou."""
    assert len(found) == len(expected), f"found {len(found)} boxes, expected {len(expected)}: {found}"
    remaining = list(found)
    for target in expected:
        best = max(remaining, key=lambda box: iou(box, target))
        assert iou(best, target) >= min_iou, f"no detection near {target}; closest {best} (IoU {iou(best, target):.2f})"
        remaining.remove(best)


@pytest.fixture(scope="module")
def vision(channel: grpc.Channel) -> vision_service_pb2_grpc.VisionServiceStub:
    return vision_service_pb2_grpc.VisionServiceStub(channel)


def detect(vision, image: common_pb2.Image, **fields) -> vision_service_pb2.DetectResponse:  # noqa: ANN001
    return vision.Detect(vision_service_pb2.DetectRequest(image=image, **fields), timeout=60)


def test_bus_has_four_people_where_a_person_would_draw_them(vision, assets: Path) -> None:  # noqa: ANN001
    response = detect(vision, common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes()))
    assert (response.image_width, response.image_height) == (810, 1080)
    assert {d.label for d in response.detections} == {"person"}
    assert all(d.class_id == 0 for d in response.detections)
    assert_matches(boxes(response), BUS_PEOPLE)
    scores = [d.score for d in response.detections]
    assert scores == sorted(scores, reverse=True)
    assert response.model.name == "yolov8" and response.model.version == "1" and not response.model.stand_in
    t = response.timings
    assert t.decode_ms > 0 and t.triton_ms > 0 and t.total_ms >= t.triton_ms


def test_zidane_has_two_people(vision, assets: Path) -> None:  # noqa: ANN001
    response = detect(vision, common_pb2.Image(encoded=(assets / "images" / "zidane.jpg").read_bytes()))
    assert (response.image_width, response.image_height) == (1280, 720)
    assert_matches(boxes(response), ZIDANE_PEOPLE)


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_png_and_webp_give_the_same_people(vision, assets: Path, ext: str) -> None:  # noqa: ANN001
    bgr = cv2.imread(str(assets / "images" / "zidane.jpg"))
    ok, encoded = cv2.imencode(ext, bgr, [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else [])
    assert ok
    response = detect(vision, common_pb2.Image(encoded=encoded.tobytes()))
    assert_matches(boxes(response), ZIDANE_PEOPLE)


@pytest.mark.parametrize("pixel_format", ["RGB8", "BGR8", "BGRA8"])
def test_raw_frame_matches_encoded(vision, assets: Path, pixel_format: str) -> None:  # noqa: ANN001
    data = (assets / "images" / "bus.jpg").read_bytes()
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    pixels = {"RGB8": cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), "BGR8": bgr, "BGRA8": cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)}[pixel_format]
    raw = common_pb2.RawFrame(
        width=bgr.shape[1], height=bgr.shape[0], pixel_format=common_pb2.PixelFormat.Value(f"PIXEL_FORMAT_{pixel_format}"),
        data=pixels.tobytes(),
    )  # fmt: skip
    from_raw = detect(vision, common_pb2.Image(raw=raw))
    from_jpeg = detect(vision, common_pb2.Image(encoded=data))
    np.testing.assert_allclose(boxes(from_raw), boxes(from_jpeg), atol=0.01)
    np.testing.assert_allclose([d.score for d in from_raw.detections], [d.score for d in from_jpeg.detections], atol=1e-5)


def test_large_jpeg_boxes_are_in_original_pixels(vision, assets: Path) -> None:  # noqa: ANN001
    # 3x the size of bus.jpg: decoded at reduced scale inside, but every box must come back in
    # the pixels of the image that was sent.
    bgr = cv2.imread(str(assets / "images" / "bus.jpg"))
    big = cv2.resize(bgr, None, fx=1.6, fy=1.6, interpolation=cv2.INTER_CUBIC)  # 1296x1728 = 2.2 MP, under the 3 MP test limit
    ok, encoded = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    response = detect(vision, common_pb2.Image(encoded=encoded.tobytes()))
    assert (response.image_width, response.image_height) == (big.shape[1], big.shape[0])
    assert_matches(boxes(response), [tuple(v * 1.6 for v in box) for box in BUS_PEOPLE])


def test_class_filter_and_limits(vision, assets: Path) -> None:  # noqa: ANN001
    image = common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes())
    only_bus = detect(vision, image, class_names=["bus"])
    assert [d.label for d in only_bus.detections] == ["bus"]
    assert iou(boxes(only_bus)[0], (20, 225, 800, 775)) > 0.8
    every = detect(vision, image, all_classes=True)
    assert {d.label for d in every.detections} >= {"person", "bus"}
    by_id = detect(vision, image, class_ids=[5])
    assert [d.label for d in by_id.detections] == ["bus"]
    top = detect(vision, image, max_detections=1)
    assert len(top.detections) == 1 and top.detections[0].score == pytest.approx(max(d.score for d in every.detections if d.label == "person"))
    strict = detect(vision, image, confidence_threshold=0.85)
    assert len(strict.detections) == 3 and all(d.score > 0.85 for d in strict.detections)


def test_concurrent_requests_batch_inside_triton(vision, assets: Path, triton, orchestrator) -> None:  # noqa: ANN001
    image = common_pb2.Image(encoded=(assets / "images" / "zidane.jpg").read_bytes())
    stats_client = triton_grpc.InferenceServerClient(triton.url)

    def counts() -> tuple[int, int]:
        stats = stats_client.get_inference_statistics("yolov8").model_stats[0]
        return stats.inference_count, stats.execution_count

    before = counts()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: detect(vision, image), range(48)))
    after = counts()
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert all(len(r.detections) == 2 for r in results)
    assert inferences == 48
    transfers = httpx.get(orchestrator.metrics_url, timeout=5).text
    # 16 concurrent calls, 4 shared-memory slots: both transfer paths were used.
    for path in ("shm", "grpc"):
        assert re.search(rf'framewise_triton_transfers_total{{model="yolov8",path="{path}"}} [1-9]', transfers), path
    # Dynamic batching merged requests: fewer model executions than inferences.
    assert executions < inferences, f"no batching: {inferences} inferences in {executions} executions"
    print(f"average batch size {inferences / executions:.2f}")


def test_detections_under_load_equal_a_lone_requests(  # noqa: ANN001
        vision, assets: Path, triton, cpu_repository: Path) -> None:
    """A request alone runs on an instance's wide session (every core, spinning), one beside
    another instance's call on the narrow session (engines/python_backend/onnx_model.py): which
    one ran must not change a single number."""
    image = common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes())

    def found(response: vision_service_pb2.DetectResponse) -> list[tuple]:
        return [(d.label, d.score, d.box.x1, d.box.y1, d.box.x2, d.box.y2) for d in response.detections]

    lone = found(detect(vision, image, all_classes=True))
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda _: found(detect(vision, image, all_classes=True)), range(24)))
    assert len(lone) >= 5 and all(result == lone for result in loaded)
    config = text_format.Parse((cpu_repository / "yolov8" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    if config.parameters["contended_intra_op_threads"].string_value != "0":  # the repository of a 2-core machine
        log = (triton.work_dir / "tritonserver.log").read_text(errors="replace")
        described = [line for line in log.splitlines() if "yolov8 instance yolov8_" in line]
        assert described and all("while another instance executes" in line for line in described)


def test_deadline_is_honoured(vision, assets: Path) -> None:  # noqa: ANN001
    image = common_pb2.Image(encoded=(assets / "images" / "bus.jpg").read_bytes())
    with pytest.raises(grpc.RpcError) as info:
        vision.Detect(vision_service_pb2.DetectRequest(image=image), timeout=0.005)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(detect(vision, image).detections) == 4
