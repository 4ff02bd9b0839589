"""Every string field of every request the server takes is bounded (server/request_limits.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.longrunning import operations_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from framewise.v1 import jobs_service_pb2, tracking_service_pb2, vision_service_pb2
from server.errors import InvalidInput
from server.request_limits import DEFAULT_MAX_CHARS, FIELD_LIMITS, check_string_lengths

SERVICES = [
    vision_service_pb2.DESCRIPTOR.services_by_name["VisionService"],
    tracking_service_pb2.DESCRIPTOR.services_by_name["TrackingService"],
    jobs_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    operations_pb2.DESCRIPTOR.services_by_name["Operations"],
]


def string_fields(message: Descriptor, path: tuple[FieldDescriptor, ...] = ()) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every string field reachable from ``message`` (as the path of fields leading to it)."""
    for field in message.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield (*path, field)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type not in [f.message_type for f in path]:
            yield from string_fields(field.message_type, (*path, field))


def request_with(path: tuple[FieldDescriptor, ...], value: str) -> tuple[Message, str]:
    """A request whose string at ``path`` is ``value`` (the first element of any list), and the
    field path the check should name."""
    request = GetMessageClass(path[0].containing_type)()
    target, names = request, []
    for field in path[:-1]:
        if field.is_repeated:
            target = getattr(target, field.name).add()
            names.append(f"{field.name}[0]")
        else:
            target = getattr(target, field.name)
            names.append(field.name)
    last = path[-1]
    if last.is_repeated:
        getattr(target, last.name).append(value)
        names.append(f"{last.name}[0]")
    else:
        setattr(target, last.name, value)
        names.append(last.name)
    return request, ".".join(names)


CASES = sorted(
    {path: None for service in SERVICES for method in service.methods for path in string_fields(method.input_type)},
    key=lambda p: ".".join(f.full_name for f in p),
)


def test_every_request_has_its_strings_covered() -> None:
    names = {path[-1].full_name for path in CASES}
    # The strings the probe sent oversized, among many others.
    assert {
        "framewise.v1.DetectRequest.class_names",
        "framewise.v1.OpenSession.resume_session_id",
        "framewise.v1.SegmentVideoRequest.server_path",
        "framewise.v1.UploadHeader.filename",
        "google.longrunning.GetOperationRequest.name",
    } <= names
    assert set(FIELD_LIMITS) <= names  # no limit for a field that does not exist


@pytest.mark.parametrize("path", CASES, ids=[".".join(f.name for f in p) + f"@{p[0].containing_type.name}" for p in CASES])
def test_a_string_over_its_limit_is_refused_naming_the_field(path: tuple[FieldDescriptor, ...]) -> None:
    limit = FIELD_LIMITS.get(path[-1].full_name, DEFAULT_MAX_CHARS)
    at_limit, _ = request_with(path, "x" * limit)
    check_string_lengths(at_limit)
    over, named = request_with(path, "x" * (limit + 1))
    with pytest.raises(InvalidInput) as refused:
        check_string_lengths(over)
    assert refused.value.violations[0].field == named
    assert f"{limit + 1} characters long; at most {limit}" in refused.value.message
    assert len(refused.value.message) < 200  # the value itself is never quoted


def test_bytes_are_not_strings() -> None:
    # An image's bytes are bounded by the message size, not here.
    check_string_lengths(vision_service_pb2.DetectRequest(image={"encoded": b"\xff" * 100_000}))
