"""Errors a request can end with, and how they become gRPC statuses (AIP-193).

Pipelines raise these; servicers turn them into a gRPC status with google.rpc details, so a
client gets the right code, a message it can act on, and the offending field by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

# A status travels in the response trailers (grpc-message, percent-encoded: up to 3 bytes per
# byte; grpc-status-details-bin, base64), and a client refuses trailers over its metadata limit
# (16 KiB in grpcio) with RESOURCE_EXHAUSTED "Stream removed", hiding the real status. These
# bounds keep a whole status under ~6 KiB on the wire whatever the message holds.
MAX_MESSAGE_BYTES = 1024
MAX_VIOLATION_BYTES = 512
MAX_VIOLATIONS = 4
# How much of a client's value an error message quotes.
SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client's value quoted in an error message, shortened: a message echoes what it got so the
    caller can find the mistake, but must never grow with the input (see MAX_MESSAGE_BYTES)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def bounded(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, on a character boundary, marked as cut."""
    encoded = text.encode("utf-8")
    if len(encoded) <= max_bytes:
        return text
    return encoded[: max_bytes - 3].decode("utf-8", errors="ignore") + "..."


@dataclass
class FieldViolation:
    field: str
    description: str


@dataclass
class ServiceError(Exception):
    """A failure with a gRPC status code and a message meant for the caller."""

    message: str
    violations: list[FieldViolation] = field(default_factory=list)
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # Seconds after which a retry makes sense (google.rpc.RetryInfo), for UNAVAILABLE.
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def to_status(self) -> status_pb2.Status:
        """The status with the message and details bounded (MAX_MESSAGE_BYTES and friends)."""
        details: list[any_pb2.Any] = []
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=bounded(v.field, MAX_VIOLATION_BYTES // 4),
                        description=bounded(v.description, MAX_VIOLATION_BYTES),
                    )
                    for v in self.violations[:MAX_VIOLATIONS]
                ]
            )
            details.append(_pack(bad_request))
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(retry))
        return status_pb2.Status(
            code=_CODE_NUMBER[self.code], message=bounded(self.message, MAX_MESSAGE_BYTES), details=details
        )


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidInput(ServiceError):
    """The request is wrong and must be changed by the caller (INVALID_ARGUMENT)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        violations = [FieldViolation(field, message)] if field else []
        super().__init__(message, violations, grpc.StatusCode.INVALID_ARGUMENT)


class TooLarge(ServiceError):
    """The request exceeds a configured limit (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        violations = [FieldViolation(field, message)] if field else []
        super().__init__(message, violations, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Unavailable(ServiceError):
    """A dependency (Triton, a model) is not ready; retrying later may succeed (UNAVAILABLE)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, [], grpc.StatusCode.UNAVAILABLE, retry_after_s)


class Unauthenticated(ServiceError):
    """No credential, or one that does not hold (UNAUTHENTICATED). The message says what is
    missing or expected, never why a presented credential failed: that helps a guesser."""

    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.UNAUTHENTICATED)


class PermissionDenied(ServiceError):
    """An authenticated caller lacks the scope an RPC family needs (PERMISSION_DENIED)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class QuotaViolation:
    """One google.rpc.QuotaFailure violation: which quota (subject) and what it allows."""

    subject: str
    description: str


class QuotaExceeded(ServiceError):
    """A tenant's quota is used up (RESOURCE_EXHAUSTED with google.rpc.QuotaFailure and
    RetryInfo, the time after which the quota will have room again)."""

    def __init__(self, message: str, violations: list[QuotaViolation], retry_after_s: float) -> None:
        super().__init__(message, [], grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s)
        self.quota_violations = violations

    def to_status(self) -> status_pb2.Status:
        status = super().to_status()
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=bounded(v.subject, MAX_VIOLATION_BYTES // 4), description=bounded(v.description, MAX_VIOLATION_BYTES)
                )
                for v in self.quota_violations[:MAX_VIOLATIONS]
            ]
        )
        status.details.append(_pack(failure))
        return status


class DeadlineExceeded(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.DEADLINE_EXCEEDED)


_CODE_NUMBER = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
