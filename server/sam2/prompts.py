"""Box and point prompts for the SAM 2 mask decoder: validation and tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from framewise.v1 import common_pb2
from server.errors import InvalidInput
from server.sam2 import contract as sam2


# Points per object prompt. SAM 2 is trained with up to about a dozen clicks; a cap keeps one
# request from growing the decoder's prompt tensor without bound.
MAX_POINTS = 64


@dataclass(frozen=True)
class ObjectPrompt:
    """A prompt in original-frame pixels, validated."""

    object_id: int
    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float, int], ...]  # x, y, label (1 positive, 0 negative)

    @property
    def single_mask(self) -> bool:
        # SAM 2 asks for one mask when the prompt has more than one point (a box counts as two).
        return (2 if self.box else 0) + len(self.points) > 1


def prompt_from_proto(
    object_id: int, box: common_pb2.BoundingBox | None, points: list[common_pb2.PointPrompt], field: str
) -> ObjectPrompt:
    """The API's box / point messages as an ObjectPrompt (coordinates still in image pixels)."""
    if len(points) > MAX_POINTS:
        raise InvalidInput(
            f"{len(points)} points in one prompt; at most {MAX_POINTS} are accepted", f"{field}points"
        )
    if box is not None and not all(math.isfinite(v) for v in (box.x1, box.y1, box.x2, box.y2)):
        raise InvalidInput(
            f"box ({box.x1}, {box.y1}, {box.x2}, {box.y2}) is not made of finite numbers (NaN or infinity)", f"{field}box"
        )
    parsed = []
    for point in points:
        if not (math.isfinite(point.point.x) and math.isfinite(point.point.y)):
            raise InvalidInput(
                f"point ({point.point.x}, {point.point.y}) is not made of finite numbers (NaN or infinity)",
                f"{field}points.point",
            )
        if point.label not in (common_pb2.POINT_LABEL_POSITIVE, common_pb2.POINT_LABEL_NEGATIVE):
            raise InvalidInput(
                "every point needs a label: POINT_LABEL_POSITIVE or POINT_LABEL_NEGATIVE", f"{field}points.label"
            )
        parsed.append((point.point.x, point.point.y, 1 if point.label == common_pb2.POINT_LABEL_POSITIVE else 0))
    corners = (box.x1, box.y1, box.x2, box.y2) if box is not None else None
    return ObjectPrompt(object_id, corners, tuple(parsed))


def check_inside(prompt: ObjectPrompt, width: int, height: int, field: str) -> None:
    """A usable prompt inside a width x height image; `field` prefixes the names in errors."""
    if prompt.object_id <= 0:
        raise InvalidInput(f"object_id must be > 0, got {prompt.object_id}", f"{field}.object_id")
    if prompt.box is None and not prompt.points:
        raise InvalidInput("a prompt needs a box or at least one point", field or "box")
    field = f"{field}." if field else ""
    if prompt.box is not None:
        x1, y1, x2, y2 = prompt.box
        if not all(math.isfinite(v) for v in prompt.box):
            raise InvalidInput(f"box ({x1}, {y1}, {x2}, {y2}) is not made of finite numbers (NaN or infinity)", f"{field}box")
        if not (x2 > x1 and y2 > y1):
            raise InvalidInput(
                f"box ({x1}, {y1}, {x2}, {y2}) has zero or negative area: x2 > x1 and y2 > y1 are required",
                f"{field}box",
            )
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise InvalidInput(f"box ({x1}, {y1}, {x2}, {y2}) is not inside the {width}x{height} frame", f"{field}box")
    for x, y, _ in prompt.points:
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InvalidInput(f"point ({x}, {y}) is not made of finite numbers (NaN or infinity)", f"{field}points")
        if not (0 <= x <= width and 0 <= y <= height):
            raise InvalidInput(f"point ({x}, {y}) is outside the {width}x{height} frame", f"{field}points")


def prompt_tensors(
    prompts: list[ObjectPrompt | None], width: int, height: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """point_coords [B,P,2] in model pixels and point_labels [B,P], padded with label -1."""
    sx, sy = size / width, size / height
    rows = []
    for prompt in prompts:
        points: list[tuple[float, float, int]] = []
        if prompt is not None:
            points += [
                (x * sx, y * sy, sam2.POSITIVE if label == 1 else sam2.NEGATIVE) for x, y, label in prompt.points
            ]
            if prompt.box is not None:
                x1, y1, x2, y2 = prompt.box
                points += [(x1 * sx, y1 * sy, sam2.BOX_TOP_LEFT), (x2 * sx, y2 * sy, sam2.BOX_BOTTOM_RIGHT)]
        rows.append(points or [(0.0, 0.0, sam2.PADDING)])
    width = max(len(r) for r in rows)
    coords = np.zeros((len(rows), width, 2), np.float32)
    labels = np.full((len(rows), width), sam2.PADDING, np.int32)
    for b, row in enumerate(rows):
        for p, (x, y, label) in enumerate(row):
            coords[b, p] = (x, y)
            labels[b, p] = label
    return coords, labels
