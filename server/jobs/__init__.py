"""Durable long-running jobs (AIP-151): talking videos and video segmentation, run to their end
across restarts, watched event by event.

    store/   where operations, events and artifact rows live (the JobStore protocol; SQLite)
    engine/  how a job runs: the queue and its lanes, the executor (stages, checkpoints,
             retries), the job context, failures, model slots, event fan-out, retention
    worker/  the job worker process: jobs run in a child of the serving process
    files/   the storage tiers, uploads, durable writes and artifact files
    kinds/   the job kinds: talking_video/, segment_video/

The service wires them in server/wiring/jobs.py (both processes: server/app.py, server/app_worker.py).
This package's face is the store and the event fan-out that the Operations / WatchOperation
services build on:

    store = SqliteJobStore(path)              # JobStore protocol
    bus = EventBus(store, heartbeat_s=30)
    op, created = await store.create_operation(kind=..., request=req.SerializeToString(),
                                               request_id=req.request_id)
    await bus.emit(op.name, "stage_update", StageUpdate(...).SerializeToString(),
                   update=OperationUpdate(state=JobState.RUNNING, stage=..., percent=...))
    async for item in bus.subscribe(op.name, after_sequence):   # EventRecord | Heartbeat
        ...
"""

from server.jobs.engine.events import EventBus, Heartbeat, Subscription, WatchItem
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
from server.jobs.store.sqlite import SqliteJobStore

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
