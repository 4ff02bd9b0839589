"""How a job fails: its error classes and what the executor does with each.

* ``RECOVERABLE`` (transient network failure, busy model) and ``EXTERNAL`` (D-ID rate limit or
  outage): retried with exponential backoff and jitter; every retry is an ``error`` event with
  ``will_retry=true``.
* ``PERMANENT`` (bad input: no person found, not an image, not audio): fails at once with an
  actionable message.
* ``RESOURCE`` (out of disk, out of D-ID credits): fails with a message for the operator. A
  stage that runs out of disk (ENOSPC, EDQUOT) is this class, not an internal error.

A stage raises :class:`JobFailure`; anything else that escapes a stage is a bug and is
reported as an INTERNAL, permanent failure (never retried: it would fail the same way).

A failure's description goes to the client (Operation.error, the error events), so it never
shows a server path: an absolute path in it is cut to its last part (``redact_paths``).
"""

from __future__ import annotations

import errno
import re

import grpc

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.did.errors import DIDError

__all__ = ["RETRYABLE_CLASSES", "JobCancelled", "JobFailure", "from_did_error", "from_os_error", "redact_paths"]

RETRYABLE_CLASSES = frozenset({jobs_pb2.ERROR_CLASS_RECOVERABLE, jobs_pb2.ERROR_CLASS_EXTERNAL})

# The google.rpc.Code an operation ends with for each class (Operation.error.code).
_CODE_BY_CLASS = {
    jobs_pb2.ERROR_CLASS_RECOVERABLE: grpc.StatusCode.UNAVAILABLE,
    jobs_pb2.ERROR_CLASS_PERMANENT: grpc.StatusCode.INVALID_ARGUMENT,
    jobs_pb2.ERROR_CLASS_RESOURCE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    jobs_pb2.ERROR_CLASS_EXTERNAL: grpc.StatusCode.UNAVAILABLE,
}


class JobFailure(Exception):
    """A classified job error. ``kind`` is machine-readable ("no_person_found", D-ID's own kind),
    ``description`` tells the user what to do."""

    def __init__(
        self,
        error_class: int,
        kind: str,
        description: str,
        *,
        code: grpc.StatusCode | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        description = redact_paths(description)
        super().__init__(f"{kind}: {description}")
        self.error_class = error_class
        self.kind = kind
        self.description = description
        self.code = code or _CODE_BY_CLASS.get(error_class, grpc.StatusCode.INTERNAL)
        self.retry_after_s = retry_after_s
        # Whole-stage attempts made when the job gave up (set by the executor).
        self.attempts = 1
        # The person (1-based rank) whose work failed in an all-persons talking video; 0 when the
        # failure is the whole job's. Carried into the error events' JobError.person.
        self.person = 0

    @property
    def retryable(self) -> bool:
        return self.error_class in RETRYABLE_CLASSES

    @classmethod
    def permanent(cls, kind: str, description: str, *, code: grpc.StatusCode | None = None) -> JobFailure:
        return cls(jobs_pb2.ERROR_CLASS_PERMANENT, kind, description, code=code)

    @classmethod
    def recoverable(cls, kind: str, description: str) -> JobFailure:
        return cls(jobs_pb2.ERROR_CLASS_RECOVERABLE, kind, description)

    @classmethod
    def resource(cls, kind: str, description: str) -> JobFailure:
        return cls(jobs_pb2.ERROR_CLASS_RESOURCE, kind, description)

    @classmethod
    def external(cls, kind: str, description: str, *, retry_after_s: float | None = None) -> JobFailure:
        return cls(jobs_pb2.ERROR_CLASS_EXTERNAL, kind, description, retry_after_s=retry_after_s)


class JobCancelled(Exception):
    """Raised inside a job when its cancellation was requested."""


_DID_CLASSES = {
    "recoverable": jobs_pb2.ERROR_CLASS_RECOVERABLE,
    "permanent": jobs_pb2.ERROR_CLASS_PERMANENT,
    "resource": jobs_pb2.ERROR_CLASS_RESOURCE,
    "external": jobs_pb2.ERROR_CLASS_EXTERNAL,
}


def from_did_error(error: DIDError) -> JobFailure:
    """D-ID's own classification carries over; a permanent D-ID error is a bad request on our
    side or a rejected photo, so the code says FAILED_PRECONDITION only for configuration."""
    error_class = _DID_CLASSES[error.error_class]
    code = None
    if error.kind == "ConfigurationError" or error.status in (401, 403):
        code = grpc.StatusCode.FAILED_PRECONDITION
    # The D-ID client already retried transient errors itself (each retry was reported through
    # on_retry); what reaches the job is final for this attempt of the stage.
    return JobFailure(error_class, error.kind, str(error), code=code, retry_after_s=error.retry_after_s)


def from_os_error(error: OSError) -> JobFailure | None:
    """A full disk (or quota) is a RESOURCE failure for the operator; None for any other OSError
    (a bug or a missing file: the caller's generic handling applies)."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" writing {redact_paths(str(error.filename))}" if error.filename else ""
    return JobFailure.resource(
        "disk_full",
        f"the server ran out of disk space{where} ({error.strerror}); an operator must free space on the "
        "storage volume (or shorten --retention-*), then the job can be submitted again",
    )


# An absolute path of two or more parts, not inside a URL ("http://host/a/b": the lookbehind
# refuses a "/" after ":", "/" or a word character) nor a fraction ("1/2").
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s/'\"(),;:]+/)+([^\s/'\"(),;:]*)")


def redact_paths(text: str) -> str:
    """``text`` with every absolute server path cut to ".../<last part>": a client learns which
    file (frames.png), never where the server keeps it."""
    return _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}", text)
