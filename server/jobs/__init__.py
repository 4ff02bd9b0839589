"""Durable long-running jobs (AIP-151): the operation/event/artifact store and the event
fan-out that the job runner and the Operations / WatchOperation services build on.

    store = SqliteJobStore(path)              # JobStore protocol
    bus = EventBus(store, heartbeat_s=30)
    op, created = await store.create_operation(kind=..., request=req.SerializeToString(),
                                               request_id=req.request_id)
    await bus.emit(op.name, "stage_update", StageUpdate(...).SerializeToString(),
                   update=OperationUpdate(state=JobState.RUNNING, stage=..., percent=...))
    async for item in bus.subscribe(op.name, after_sequence):   # EventRecord | Heartbeat
        ...
"""

from server.jobs.events import EventBus, Heartbeat, Subscription, WatchItem
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import (
    TERMINAL_EVENT_TYPES,
    ArtifactRecord,
    EventRecord,
    JobState,
    JobStore,
    JobStoreError,
    OperationNotFinishedError,
    OperationNotFoundError,
    OperationRecord,
    OperationUpdate,
    RequestIdConflictError,
)

__all__ = [
    "TERMINAL_EVENT_TYPES",
    "ArtifactRecord",
    "EventBus",
    "EventRecord",
    "Heartbeat",
    "JobState",
    "JobStore",
    "JobStoreError",
    "OperationNotFinishedError",
    "OperationNotFoundError",
    "OperationRecord",
    "OperationUpdate",
    "RequestIdConflictError",
    "SqliteJobStore",
    "Subscription",
    "WatchItem",
]
