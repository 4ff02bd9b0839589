"""A small, strict multipart/form-data parser (RFC 7578) for the emulator's upload endpoints.

Works on the raw body bytes, so binary file content round-trips exactly (no line-ending
normalisation); header parameters are parsed with the standard library's ``email`` package.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message


class MultipartError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


def _header_params(name: str, value: str) -> Message:
    message = Message()
    message[name] = value
    return message


def boundary_of(content_type: str) -> bytes:
    message = _header_params("Content-Type", content_type)
    if message.get_content_type() != "multipart/form-data":
        raise MultipartError(f"expected Content-Type multipart/form-data, got {message.get_content_type()!r}")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError("multipart/form-data without a valid boundary parameter")
    return boundary.encode("latin-1")


def parse_multipart(content_type: str, body: bytes) -> dict[str, Part]:
    """Parts by field name (the first part wins when a name repeats)."""
    delimiter = b"--" + boundary_of(content_type)
    start = body.find(delimiter)
    if start < 0:
        raise MultipartError("multipart body does not contain its boundary")
    parts: dict[str, Part] = {}
    position = start + len(delimiter)
    while True:
        if body[position : position + 2] == b"--":
            return parts  # closing delimiter
        if body[position : position + 2] != b"\r\n":
            raise MultipartError("malformed multipart delimiter line")
        header_end = body.find(b"\r\n\r\n", position + 2)
        if header_end < 0:
            raise MultipartError("multipart part without a blank line after its headers")
        headers = _parse_headers(body[position + 2 : header_end])
        content_start = header_end + 4
        next_delimiter = body.find(b"\r\n" + delimiter, content_start)
        if next_delimiter < 0:
            raise MultipartError("multipart body is truncated (no closing boundary)")
        part = _make_part(headers, body[content_start:next_delimiter])
        parts.setdefault(part.name, part)
        position = next_delimiter + 2 + len(delimiter)


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.decode("utf-8", "replace").partition(":")
        if not sep:
            raise MultipartError(f"malformed multipart header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def _make_part(headers: dict[str, str], data: bytes) -> Part:
    disposition = headers.get("content-disposition")
    if not disposition:
        raise MultipartError("multipart part without Content-Disposition")
    message = _header_params("Content-Disposition", disposition)
    name = message.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise MultipartError("multipart part without a field name")
    filename = message.get_filename()
    content_type = headers.get("content-type", "application/octet-stream")
    return Part(name=name, filename=filename, content_type=content_type, data=data)
