"""The job store: where operations, their events and artifacts live durably.

    protocol.py         the JobStore protocol, its records (OperationRecord, EventRecord,
                        ArtifactRecord, OperationUpdate, ReplicaRecord, ApiKeyRecord), JobState and
                        the store errors
    sqlite.py           SqliteJobStore: the embedded single-replica backend
    sqlite_schema.py    SQLite DDL and row <-> record conversion
    postgres.py         PostgresJobStore: the store replicas share
    postgres_schema.py  PostgreSQL DDL, versioned migrations, row <-> record conversion
    postgres_listen.py  the store's one LISTEN connection (reconnects by itself, then RESYNC)
    notifications.py    JobStore.listen's wake-ups: event committed, queued, cancel, released
    sqlite_api_keys.py  the API key table's methods, SQLite (a base of SqliteJobStore)
    postgres_api_keys.py  the same on PostgreSQL (a base of PostgresJobStore)
    factory.py          open_job_store(url): a path or sqlite:/// URL, or a postgresql:// URL

This package re-exports the protocol names so callers write
`from server.jobs.store import JobStore, JobState`; a backend is imported from its module.
"""

from server.jobs.store.protocol import (
    EVENT_TYPES,
    TERMINAL_EVENT_TYPES,
    TERMINAL_STATES,
    UNFINISHED_STATES,
    ApiKeyExistsError,
    ApiKeyRecord,
    ArtifactRecord,
    EventRecord,
    JobState,
    JobStore,
    JobStoreError,
    JobStoreUnavailableError,
    LeaseLostError,
    OperationNotFinishedError,
    OperationNotFoundError,
    OperationRecord,
    OperationUpdate,
    OtherTenantError,
    ReplicaRecord,
    RequestIdConflictError,
    check_lease_args,
    utcnow,
)

__all__ = [
    "EVENT_TYPES",
    "TERMINAL_EVENT_TYPES",
    "TERMINAL_STATES",
    "UNFINISHED_STATES",
    "ApiKeyExistsError",
    "ApiKeyRecord",
    "ArtifactRecord",
    "EventRecord",
    "JobState",
    "JobStore",
    "JobStoreError",
    "JobStoreUnavailableError",
    "LeaseLostError",
    "OperationNotFinishedError",
    "OperationNotFoundError",
    "OperationRecord",
    "OperationUpdate",
    "OtherTenantError",
    "ReplicaRecord",
    "RequestIdConflictError",
    "check_lease_args",
    "utcnow",
]
