"""The video predictor's own helpers (server/sam2/video_predictor.py), in process; the predictor
against a real Triton is tests/e2e/test_tracking.py."""

from __future__ import annotations

import pytest

from server.errors import Unavailable
from server.sam2.video_predictor import _each


async def test_concurrent_object_calls_fail_with_the_first_error_itself() -> None:
    """Several objects' Triton calls run in a task group; a failure must reach the servicer as
    the ServiceError it is (UNAVAILABLE, DEADLINE_EXCEEDED), not as an ExceptionGroup."""

    async def call(object_id: int) -> None:
        if object_id == 2:
            raise Unavailable("model 'sam2_track_step' is not ready")

    with pytest.raises(Unavailable):
        await _each([1, 2, 3], call)
    with pytest.raises(Unavailable):
        await _each([2], call)
