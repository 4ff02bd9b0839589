"""google.longrunning.Operations (AIP-151) over the job store: Get, List (paged, filtered by
state or kind), Cancel, Delete, Wait. Also the record -> Operation conversion the submit RPCs
share.

Every call sees the caller's tenant's operations only: another tenant's operation is NOT_FOUND
with the message of a name that does not exist, and List lists the caller's own."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import status_pb2

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.errors import InvalidInput, ServiceError, shown
from server.jobs.engine.events import EventBus
from server.jobs.engine.queue import JobQueue
from server.jobs.files.artifacts import delete_operation
from server.jobs.store import (
    JobState,
    OperationNotFinishedError,
    OperationNotFoundError,
    OperationRecord,
    OtherTenantError,
    RequestIdConflictError,
)
from server.servicers import convert
from server.servicers.tenancy import caller, cross_tenant

__all__ = ["OperationsServicer", "operation_proto", "queue_position", "require_name", "store_errors"]

# WaitOperation never holds a call longer than this, whatever the client asks.
MAX_WAIT_S = 600.0
_RESPONSE_TYPES = {
    jobs_pb2.JOB_KIND_SEGMENT_VIDEO: jobs_pb2.SegmentVideoResponse,
    jobs_pb2.JOB_KIND_TALKING_VIDEO: jobs_pb2.CreateTalkingVideoResponse,
}


def job_metadata(op: OperationRecord, queue_position: int = -1) -> jobs_pb2.JobMetadata:
    metadata = jobs_pb2.JobMetadata(
        kind=op.kind,  # type: ignore[arg-type]
        state=int(op.state),  # type: ignore[arg-type]
        stage=op.stage,  # type: ignore[arg-type]
        percent=op.percent,
        message=op.message,
        last_sequence=op.last_sequence,
        queue_position=max(queue_position, 0),
        # The lease owner: the replica running the job (or that ran it last).
        replica=op.lease_owner or "",
    )
    for field, value in (
        ("create_time", op.create_time),
        ("start_time", op.start_time),
        ("update_time", op.update_time),
        ("end_time", op.end_time),
    ):
        if value is not None:
            getattr(metadata, field).CopyFrom(convert.timestamp(value))
    return metadata


async def queue_position(queue: JobQueue, op: OperationRecord) -> int:
    """Where the operation waits in the cluster's queue (-1: not waiting); a finished one is
    not looked up."""
    return -1 if op.done else await queue.queue_position(op.name)


def operation_proto(op: OperationRecord, queue_position: int = -1) -> operations_pb2.Operation:
    result = operations_pb2.Operation(name=op.name, done=op.done)
    metadata = any_pb2.Any()
    metadata.Pack(job_metadata(op, queue_position))
    result.metadata.CopyFrom(metadata)
    if op.state == JobState.SUCCEEDED and op.response is not None:
        response = any_pb2.Any()
        response.Pack(_RESPONSE_TYPES[op.kind].FromString(op.response))
        result.response.CopyFrom(response)
    elif op.done and op.error is not None:
        code, message = op.error
        result.error.CopyFrom(status_pb2.Status(code=code, message=message))
    return result


def require_name(name: str, field: str = "name") -> str:
    """An operation name the caller must give: empty is a malformed request (INVALID_ARGUMENT),
    not an operation that cannot be found."""
    if not name:
        raise InvalidInput(f"{field} is empty: give the operation's name, operations/<id>, as the submit RPC returned it", field)
    return name


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """The store's exceptions as the API's statuses. Another tenant's operation reads exactly as
    an unknown one (the same message), and is audited."""
    try:
        yield
    except OperationNotFoundError as exc:
        if isinstance(exc, OtherTenantError):
            cross_tenant(exc.name)
        raise ServiceError(f"{exc}; names look like operations/<id> as returned by the submit RPC", code=grpc.StatusCode.NOT_FOUND) from None
    except OperationNotFinishedError as exc:
        raise ServiceError(f"{exc}; cancel it first or wait for it to finish", code=grpc.StatusCode.FAILED_PRECONDITION) from None
    except RequestIdConflictError as exc:
        raise ServiceError(str(exc), code=grpc.StatusCode.ALREADY_EXISTS) from None


_STATE_NAMES = {s.name: s for s in JobState if s != JobState.UNSPECIFIED}
_KIND_NAMES = {"SEGMENT_VIDEO": jobs_pb2.JOB_KIND_SEGMENT_VIDEO, "TALKING_VIDEO": jobs_pb2.JOB_KIND_TALKING_VIDEO}
_TERM = re.compile(r"^\s*(state|kind|done)\s*=\s*\"?([A-Za-z_]+)\"?\s*$")
FILTER_HELP = (
    'filters: state = RUNNING (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED; several joined with OR), '
    'kind = SEGMENT_VIDEO | TALKING_VIDEO, done = true | false, terms joined with AND'
)


def parse_filter(text: str) -> tuple[tuple[JobState, ...] | None, int | None]:
    """A small AIP-160 subset: ``state = X [OR state = Y]``, ``kind = K``, ``done = true``,
    joined with AND. Returns (states or None, kind or None)."""
    states: set[JobState] | None = None
    kind: int | None = None
    if not text.strip():
        return None, None
    for clause in re.split(r"\s+AND\s+", text.strip()):
        clause_states: set[JobState] = set()
        for term in re.split(r"\s+OR\s+", clause.strip().strip("()")):
            match = _TERM.match(term)
            if match is None:
                raise InvalidInput(f"cannot parse filter term {shown(term)}; {FILTER_HELP}", "filter")
            key, value = match.group(1), match.group(2).upper()
            if key == "state":
                value = value.removeprefix("JOB_STATE_")
                if value not in _STATE_NAMES:
                    raise InvalidInput(f"unknown state {shown(value)}; {FILTER_HELP}", "filter")
                clause_states.add(_STATE_NAMES[value])
            elif key == "done":
                if value not in ("TRUE", "FALSE"):
                    raise InvalidInput(f"done must be true or false; {FILTER_HELP}", "filter")
                clause_states |= {s for s in _STATE_NAMES.values() if s.is_terminal == (value == "TRUE")}
            else:
                if "OR" in clause:
                    raise InvalidInput(f"OR is only supported between state terms; {FILTER_HELP}", "filter")
                value = value.removeprefix("JOB_KIND_")
                if value not in _KIND_NAMES:
                    raise InvalidInput(f"unknown kind {shown(value)}; {FILTER_HELP}", "filter")
                kind = _KIND_NAMES[value]
        if clause_states:
            states = clause_states if states is None else states & clause_states
    if states is not None and not states:
        raise InvalidInput("the filter's state terms exclude every state", "filter")
    return (tuple(sorted(states)) if states is not None else None), kind


class OperationsServicer(operations_pb2_grpc.OperationsServicer):
    def __init__(self, queue: JobQueue, bus: EventBus) -> None:
        self.queue = queue
        self.bus = bus
        self.store = bus.store

    async def GetOperation(self, request: operations_pb2.GetOperationRequest, context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        with store_errors():
            op = await self.store.get_operation(require_name(request.name), tenant=caller().tenant)
        return operation_proto(op, await queue_position(self.queue, op))

    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.ListOperationsResponse:
        if request.name not in ("", "operations"):
            raise InvalidInput(f"name must be 'operations' (or empty), got {shown(request.name)}", "name")
        if request.page_size < 0:
            raise InvalidInput("page_size must be >= 0", "page_size")
        states, kind = parse_filter(request.filter)
        try:
            ops, token = await self.store.list_operations(
                states=states, kind=kind, page_size=request.page_size, page_token=request.page_token, tenant=caller().tenant
            )
        except ValueError as exc:  # not our token, or one issued for another filter (AIP-158)
            raise InvalidInput(str(exc), "page_token") from None
        return operations_pb2.ListOperationsResponse(
            operations=[operation_proto(op, await queue_position(self.queue, op)) for op in ops], next_page_token=token
        )

    async def CancelOperation(self, request: operations_pb2.CancelOperationRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        with store_errors():
            # The operation is the caller's (checked here; a tenant never changes), so the queue
            # cancels it by name.
            op = await self.store.get_operation(require_name(request.name), tenant=caller().tenant)
            if op.done:
                raise ServiceError(
                    f"operation {op.name} already finished ({op.state.name}); nothing to cancel",
                    code=grpc.StatusCode.FAILED_PRECONDITION,
                )
            await self.queue.cancel(request.name)
        return empty_pb2.Empty()

    async def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        with store_errors():
            await delete_operation(self.store, require_name(request.name), tenant=caller().tenant)
        return empty_pb2.Empty()

    async def WaitOperation(self, request: operations_pb2.WaitOperationRequest, context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        """Returns when the operation is done or the timeout (capped at 10 min and by the
        call's deadline) passes, whichever is first; the operation as it stands then."""
        tenant = caller().tenant
        with store_errors():
            op = await self.store.get_operation(require_name(request.name), tenant=tenant)
        if not op.done:
            limit = MAX_WAIT_S
            if request.HasField("timeout"):
                limit = min(limit, request.timeout.ToTimedelta().total_seconds())
            remaining = context.time_remaining()
            if remaining is not None:
                limit = min(limit, max(remaining - 0.05, 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(limit, 0.0)), self.bus.subscribe(op.name, op.last_sequence) as events:
                    async for item in events:
                        if item.terminal:
                            break
            with store_errors():
                op = await self.store.get_operation(request.name, tenant=tenant)
        return operation_proto(op, await queue_position(self.queue, op))
