"""How Triton's refusals reach the caller (server/triton/client.py): Triton going away under a
request is UNAVAILABLE with a retry hint, whatever status Triton used; a request Triton rejects
as malformed is our bug (INTERNAL); a timeout is DEADLINE_EXCEEDED."""

from __future__ import annotations

import grpc
import pytest

from server.triton.client import _status_error


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("UNAVAILABLE", "failed to connect to all addresses"),
        ("INTERNAL", "Server is stopping"),
        ("INTERNAL", "Failed to process the request(s) for model 'sam2_memory_attention_0_0', message: Stub process 'sam2_memory_attention_0_0' is not healthy."),
        ("NOT_FOUND", "Request for unknown model: 'yolov8' has no available versions"),
        ("UNKNOWN", "model 'matting' is not ready"),
    ],
)
def test_triton_going_away_is_unavailable_with_a_retry_hint(status: str, message: str) -> None:
    error = _status_error("yolov8", status, message, 5.0)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.retry_after_s is not None and "retry" in error.message


def test_a_request_triton_rejects_is_internal() -> None:
    error = _status_error("yolov8", "INVALID_ARGUMENT", "unexpected shape for input 'images'", 5.0)
    assert error.code == grpc.StatusCode.INTERNAL
    assert "yolov8" in error.message and "unexpected shape" in error.message


def test_a_timeout_is_deadline_exceeded() -> None:
    error = _status_error("matting", "DEADLINE_EXCEEDED", "", 2.5)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED and "2.500 s" in error.message
