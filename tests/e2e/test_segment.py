"""VisionService.Segment: one image + a box or points -> every candidate mask with its score
(SAM 2 stand-in models: shapes, prompts and errors are checked, not segmentation quality)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from framewise.v1 import common_pb2, vision_service_pb2, vision_service_pb2_grpc
from tests.e2e.test_tracking import crossing


@pytest.fixture(scope="module")
def vision(channel: grpc.Channel) -> vision_service_pb2_grpc.VisionServiceStub:
    return vision_service_pb2_grpc.VisionServiceStub(channel)


def test_box_prompt_gives_every_candidate(vision, assets: Path) -> None:  # noqa: ANN001
    frames, boxes = crossing(assets)
    x1, y1, x2, y2 = boxes[0]
    response = vision.Segment(
        vision_service_pb2.SegmentRequest(
            image=common_pb2.Image(encoded=frames[0]), box=common_pb2.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)
        ),
        timeout=60,
    )
    assert [c.index for c in response.candidates] == [0, 1, 2, 3]
    ious = [c.predicted_iou for c in response.candidates]
    assert response.best_index == int(np.argmax(ious))
    assert {m.name for m in response.models} == {"sam2_image_encoder", "sam2_mask_decoder"}
    assert all(m.stand_in for m in response.models)
    for candidate in response.candidates:
        mask = coco_mask.decode({"size": [candidate.mask.height, candidate.mask.width], "counts": candidate.mask.counts})
        assert mask.shape == (240, 360)
        ys, xs = np.nonzero(mask)
        assert (candidate.box.x1, candidate.box.y1, candidate.box.x2, candidate.box.y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # The contract decoder keeps every candidate around the box it was given.
        assert x1 - 8 <= candidate.box.x1 and candidate.box.x2 <= x2 + 8


def test_point_prompts(vision, assets: Path) -> None:  # noqa: ANN001
    frames, boxes = crossing(assets)
    x1, y1, x2, y2 = boxes[0]
    request = vision_service_pb2.SegmentRequest(image=common_pb2.Image(encoded=frames[0]))
    request.points.add(point=common_pb2.Point(x=(x1 + x2) / 2, y=(y1 + y2) / 2), label=common_pb2.POINT_LABEL_POSITIVE)
    response = vision.Segment(request, timeout=60)
    best = response.candidates[response.best_index]
    assert best.box.x1 <= (x1 + x2) / 2 <= best.box.x2


@pytest.mark.parametrize(
    ("fields", "words", "field"),
    [
        ({}, "needs a box or at least one point", "box"),
        ({"box": common_pb2.BoundingBox(x1=10, y1=10, x2=400, y2=50)}, "not inside the 360x240", "box"),
        ({"box": common_pb2.BoundingBox(x1=10, y1=10, x2=10, y2=50)}, "zero or negative area", "box"),
        ({"points": [common_pb2.PointPrompt(point=common_pb2.Point(x=5, y=5))]}, "needs a label", "points.label"),
    ],
    ids=["no prompt", "box outside", "zero-area box", "unlabelled point"],
)
def test_bad_prompts(vision, assets: Path, fields: dict, words: str, field: str) -> None:  # noqa: ANN001
    frames, _ = crossing(assets)
    with pytest.raises(grpc.RpcError) as info:
        vision.Segment(vision_service_pb2.SegmentRequest(image=common_pb2.Image(encoded=frames[0]), **fields), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
