"""Box and point prompts (server/sam2/prompts.py): what is refused, and how it is said."""

from __future__ import annotations

import math

import pytest

from framewise.v1 import common_pb2
from server.errors import InvalidInput
from server.sam2.prompts import MAX_POINTS, ObjectPrompt, check_inside, prompt_from_proto


def point(x: float, y: float, positive: bool = True) -> common_pb2.PointPrompt:
    label = common_pb2.POINT_LABEL_POSITIVE if positive else common_pb2.POINT_LABEL_NEGATIVE
    return common_pb2.PointPrompt(point=common_pb2.Point(x=x, y=y), label=label)


@pytest.mark.parametrize(
    "corners",
    [(math.nan, 1, 10, 10), (1, 1, math.inf, 10), (1, -math.inf, 10, 10), (math.nan,) * 4],
)
def test_a_box_that_is_not_finite_is_called_so_not_zero_area(corners: tuple[float, ...]) -> None:
    box = common_pb2.BoundingBox(x1=corners[0], y1=corners[1], x2=corners[2], y2=corners[3])
    with pytest.raises(InvalidInput, match="not made of finite numbers") as refused:
        prompt_from_proto(1, box, [], "frame.prompts.")
    assert "area" not in refused.value.message
    assert refused.value.violations[0].field == "frame.prompts.box"


def test_a_point_that_is_not_finite_is_called_so() -> None:
    with pytest.raises(InvalidInput, match="not made of finite numbers") as refused:
        prompt_from_proto(1, None, [point(5, 5), point(math.nan, 3)], "")
    assert refused.value.violations[0].field == "points.point"


def test_check_inside_also_names_non_finite_numbers() -> None:
    # A prompt built in code (not from a request) gets the same answer.
    with pytest.raises(InvalidInput, match="not made of finite numbers"):
        check_inside(ObjectPrompt(1, (0.0, 0.0, math.nan, 5.0), ()), 100, 100, "")
    with pytest.raises(InvalidInput, match="not made of finite numbers"):
        check_inside(ObjectPrompt(1, None, ((math.inf, 1.0, 1),)), 100, 100, "")


def test_points_are_capped() -> None:
    assert len(prompt_from_proto(1, None, [point(i % 50, 1) for i in range(MAX_POINTS)], "").points) == MAX_POINTS
    with pytest.raises(InvalidInput, match=f"{MAX_POINTS + 1} points in one prompt; at most {MAX_POINTS}") as refused:
        prompt_from_proto(1, None, [point(1, 1)] * (MAX_POINTS + 1), "frame.prompts.")
    assert refused.value.violations[0].field == "frame.prompts.points"


def test_a_zero_area_box_is_still_called_zero_area() -> None:
    prompt = prompt_from_proto(1, common_pb2.BoundingBox(x1=5, y1=5, x2=5, y2=9), [], "")
    with pytest.raises(InvalidInput, match="zero or negative area"):
        check_inside(prompt, 100, 100, "")
