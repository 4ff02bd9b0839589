"""How long a request's strings may be: one check for every string field of every request.

Why: a client's string ends up in stores, logs, metrics and error messages; unbounded, a
20,000-character class name or a 5,000-character operation name made an error status too
large for the client's metadata limit, and the client saw RESOURCE_EXHAUSTED "Stream removed"
instead of INVALID_ARGUMENT. Every string field of every request message (nested ones included)
is bounded here, before any servicer sees it; a field missing from FIELD_LIMITS gets
DEFAULT_MAX_CHARS, so a field added to the API later is bounded too.
"""

from __future__ import annotations

import functools

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from server.errors import InvalidInput

__all__ = ["DEFAULT_MAX_CHARS", "FIELD_LIMITS", "check_string_lengths"]

# Names, ids, class names, colours: far longer than any real one.
DEFAULT_MAX_CHARS = 256
# Fields whose real values can be longer (full protobuf field name -> characters).
FIELD_LIMITS: dict[str, int] = {
    # PATH_MAX: a longer path cannot name a file; one component over NAME_MAX is refused by the
    # path resolution itself (ENAMETOOLONG -> INVALID_ARGUMENT).
    "framewise.v1.SegmentVideoRequest.server_path": 4096,
    "framewise.v1.UploadHeader.filename": 1024,
    "framewise.v1.SegmentVideoRequest.request_id": 128,
    "framewise.v1.CreateTalkingVideoRequest.request_id": 128,
    "google.longrunning.ListOperationsRequest.filter": 1024,
    "google.longrunning.ListOperationsRequest.page_token": 1024,
}

_STRING = FieldDescriptor.TYPE_STRING
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def check_string_lengths(message: Message, prefix: str = "") -> None:
    """Raises InvalidInput naming the first string field (path from the request, e.g.
    ``class_names[3]`` or ``header.filename``) over its limit. Only set fields of message types
    that can hold a string are visited: a tracking frame (no string anywhere) costs ~1 us."""
    if not _holds_strings(message.DESCRIPTOR):
        return
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == _STRING:
            limit = FIELD_LIMITS.get(field.full_name, DEFAULT_MAX_CHARS)
            if field.is_repeated:
                for index, item in enumerate(value):
                    _check(item, limit, f"{path}[{index}]")
            else:
                _check(value, limit, path)
        elif field.type == _MESSAGE:
            if not field.is_repeated:
                check_string_lengths(value, f"{path}.")
            elif field.message_type.GetOptions().map_entry:
                continue  # no request has a map field
            else:
                for index, item in enumerate(value):
                    check_string_lengths(item, f"{path}[{index}].")


@functools.cache
def _holds_strings(descriptor: Descriptor) -> bool:
    """Whether a message of this type can hold a string, in itself or in any message inside it."""
    pending, seen = [descriptor], {descriptor.full_name}
    while pending:
        for field in pending.pop().fields:
            if field.type == _STRING:
                return True
            if field.type == _MESSAGE and field.message_type.full_name not in seen:
                seen.add(field.message_type.full_name)
                pending.append(field.message_type)
    return False


def _check(value: str, limit: int, path: str) -> None:
    if len(value) > limit:
        raise InvalidInput(f"{path} is {len(value)} characters long; at most {limit} are accepted", path)
