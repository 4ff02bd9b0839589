"""Errors a request can end with, and how they become gRPC statuses (AIP-193).

Pipelines raise these; servicers turn them into a gRPC status with google.rpc details, so a
client gets the right code, a message it can act on, and the offending field by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


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
        details: list[any_pb2.Any] = []
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(bad_request))
        if self.retry_after_s is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(_pack(retry))
        return status_pb2.Status(code=_CODE_NUMBER[self.code], message=self.message, details=details)


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


class DeadlineExceeded(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__(message, [], grpc.StatusCode.DEADLINE_EXCEEDED)


_CODE_NUMBER = {code: getattr(code_pb2, code.name) for code in grpc.StatusCode}
