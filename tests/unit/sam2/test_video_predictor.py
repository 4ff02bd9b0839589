"""The video predictor's own helpers (server/sam2/video_predictor.py), in process; the predictor
against a real Triton is tests/e2e/test_tracking.py."""

from __future__ import annotations

import pytest

from server.errors import Unavailable
from server.sam2.video_predictor import _batches, _each


async def test_concurrent_calls_fail_with_the_first_error_itself() -> None:
    """A frame's batched Triton calls run in a task group; a failure must reach the servicer as
    the ServiceError it is (UNAVAILABLE, DEADLINE_EXCEEDED), not as an ExceptionGroup."""

    async def call(group: list[int]) -> None:
        if 2 in group:
            raise Unavailable("model 'sam2_track_step' is not ready")

    with pytest.raises(Unavailable):
        await _each([(call, [1]), (call, [2, 3]), (call, [4])])
    with pytest.raises(Unavailable):
        await _each([(call, [2])])


def test_objects_are_batched_by_the_shapes_their_rows_must_share() -> None:
    # Rows of one call share their memory and pointer counts: objects 1, 3, 4 have 7 memories and
    # 16 pointers, object 2 (added later) 3 and 4.
    shapes = {1: (7, 16), 2: (3, 4), 3: (7, 16), 4: (7, 16)}
    assert _batches([1, 2, 3, 4], shapes.__getitem__, 4) == [[1, 3, 4], [2]]
    # More objects than a call takes: several calls, in object order.
    assert _batches(list(range(1, 11)), lambda i: 0, 4) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert _batches([], lambda i: 0, 4) == []
