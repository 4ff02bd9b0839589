"""Choosing one detected person and the crop around them: shared by RemoveBackground's
crop_person and the talking-video job, so both pick and crop the same way.

Pure box arithmetic (no gRPC, no Triton): the callers turn `PersonChoiceError` into their own
error (a gRPC status for an RPC, a permanent job failure for a job).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
# Margin around a person's box, as a fraction of its size per side: the detector's box is tight
# to the silhouette, and a portrait wants some room around the head and shoulders.
DEFAULT_CROP_MARGIN = 0.15


class PersonChoiceError(ValueError):
    """The requested person does not exist; `kind` is a stable machine-readable reason."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def select_person(
    boxes: Sequence[Box],
    *,
    index: int | None = None,
    point: tuple[float, float] | None = None,
    field: str = "person",
) -> int:
    """The index into `boxes` (detections, highest score first) of the person asked for.

    `index`: the n-th detection; `point`: the smallest box containing it; neither: the largest
    box (the person nearest the camera in a portrait). `field` names the request field in
    messages ("person.index" for a job, "person_index" for an RPC).
    """
    if not boxes:
        raise PersonChoiceError(
            "no_person_found", "no person found in the photo; use a photo in which one person is clearly visible"
        )
    if index is not None:
        if not 0 <= index < len(boxes):
            raise PersonChoiceError(
                "person_index_out_of_range",
                f"{field} is {index} but {len(boxes)} person(s) were found (indices 0..{len(boxes) - 1}, highest score first)",
            )
        return index
    if point is not None:
        x, y = point
        hits = [i for i, b in enumerate(boxes) if b[0] <= x <= b[2] and b[1] <= y <= b[3]]
        if not hits:
            raise PersonChoiceError("no_person_at_point", f"no detected person's box contains {field} ({x}, {y})")
        return min(hits, key=lambda i: area(boxes[i]))
    return max(range(len(boxes)), key=lambda i: area(boxes[i]))


def area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def crop_box(box: Box, width: int, height: int, margin: float) -> tuple[int, int, int, int]:
    """The person's box grown by `margin` of its size on each side, in whole pixels, clamped to
    the `width` x `height` image (head room and shoulders that the detector's box cuts tight)."""
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    return (
        max(0, math.floor(x1 - mx)),
        max(0, math.floor(y1 - my)),
        min(width, math.ceil(x2 + mx)),
        min(height, math.ceil(y2 + my)),
    )
