"""What the job engine needs from a job kind's definition (server/jobs/kinds/: video
segmentation, talking video).

A job kind's definition is its submit-time check, a fixed list of idempotent stages and its
response. The executor records the last completed stage
in the store after each one, so after a crash it runs only the stages that had not finished;
a stage that was cut off half-way runs again from its start, and must therefore keep whatever
it hands to the next stage on disk (``JobContext.workdir``, ``JobContext.state``), never only
in memory.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from google.protobuf.message import Message

if TYPE_CHECKING:
    from server.jobs.engine.context import JobContext
    from server.jobs.engine.failures import JobFailure

__all__ = ["JobDefinition", "Stage"]


@dataclass(frozen=True)
class Stage:
    """One checkpointed step. ``checkpoint`` is the JobStage value stored as
    ``last_completed_stage`` when ``run`` returns; it must be unique within a definition."""

    checkpoint: int
    run: Callable[[JobContext], Awaitable[None]]
    # Whole-stage attempts for RECOVERABLE/EXTERNAL failures (each retry is an error event).
    max_attempts: int = 3
    # Graceful degradation: called with the stage's final failure (retries spent, or not
    # retryable); returns True when it completed the stage another way (the job goes on), False
    # to let the job fail. Never called for a cancellation.
    fallback: Callable[[JobContext, JobFailure], Awaitable[bool]] | None = None


class JobDefinition(Protocol):
    #: framewise.v1.JobKind value this definition runs.
    kind: int
    #: Message class of the submit request (SegmentVideoRequest, CreateTalkingVideoRequest).
    request_type: type[Message]
    #: Message class of Operation.response once SUCCEEDED.
    response_type: type[Message]

    def stages(self) -> Sequence[Stage]: ...

    async def validate(self, request: Message) -> None:
        """Checks a submit request before an operation exists; raises server.errors.InvalidInput
        (or NotFound-like ServiceError) so the submit RPC fails with a clear status instead of
        creating an operation doomed to fail."""
        ...

    async def response(self, ctx: JobContext) -> Message:
        """The Operation.response, built from ctx.state and the stored artifacts after every
        stage has completed (also after a restart between the last stage and completion)."""
        ...
