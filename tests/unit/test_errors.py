"""server/errors.py: what a status says and how large it may grow."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2

from server.errors import (
    MAX_MESSAGE_BYTES,
    MAX_VIOLATION_BYTES,
    FieldViolation,
    InvalidInput,
    ServiceError,
    bounded,
    shown,
)


def test_shown_quotes_a_short_value_whole() -> None:
    assert shown("person") == "'person'"


def test_shown_shortens_a_long_value_and_says_how_long_it_was() -> None:
    text = shown("y" * 20_000)
    assert text.startswith("'yyyy") and text.endswith("... (20000 characters)") and len(text) < 100


def test_bounded_cuts_on_a_character_boundary() -> None:
    cut = bounded("\u4e2d" * 1000, 100)  # 3 bytes each
    assert len(cut.encode()) <= 100 and cut.endswith("...") and set(cut[:-3]) == {"\u4e2d"}
    assert bounded("short", 100) == "short"


def test_a_status_stays_small_whatever_its_message_and_violations() -> None:
    error = ServiceError(
        "\u00fc" * 50_000,
        [FieldViolation("f" * 5000, "d" * 50_000) for _ in range(100)],
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    status = error.to_status()
    assert len(status.message.encode()) <= MAX_MESSAGE_BYTES
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert all(len(v.description.encode()) <= MAX_VIOLATION_BYTES for v in bad_request.field_violations)
    # grpc-status-details-bin is base64 of this: well under the 16 KiB metadata limit.
    assert len(status.SerializeToString()) * 4 / 3 < 6 * 1024


def test_a_small_status_is_unchanged() -> None:
    status = InvalidInput("box is outside the frame", "box").to_status()
    bad_request = error_details_pb2.BadRequest()
    assert status.message == "box is outside the frame" and status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("box", "box is outside the frame")]
