"""The durable job store: records for operations, their events and artifacts, and the
`JobStore` protocol that every backend (SQLite now, Redis later) implements.

Conventions shared by every backend:

* Operation names are ``"operations/<uuid4 hex>"``.
* ``state``, ``stage`` and ``kind`` are the integer values of the proto enums
  ``framewise.v1.JobState``, ``JobStage`` and ``JobKind`` (``JobState`` below mirrors the
  first; the values are checked against the proto in the tests), so the gRPC layer can pass
  them straight into ``JobMetadata``.
* Times are timezone-aware UTC ``datetime`` objects (microsecond precision).
* Event payloads: ``EventRecord.event_type`` is the name of the ``WatchOperationResponse.event``
  oneof member (``"stage_update"``, ``"progress_update"``, ``"error"``, ``"complete"``) and
  ``payload`` is the serialized bytes of that member message (``StageUpdate``,
  ``ProgressUpdate``, ``JobError``, ``JobComplete``). The envelope fields (``sequence``, ``name``,
  ``time``) live in the record itself, so the watch service rebuilds the response with
  ``WatchOperationResponse(sequence=..., name=..., time=..., **{event_type: Msg.FromString(payload)})``.
  The store never parses payloads; whether an event ends the stream is the explicit
  ``terminal`` flag (``"complete"`` is always terminal; a final ``"error"`` with
  ``will_retry=false`` is appended with ``terminal=True``).
* Heartbeats are never stored (see ``server.jobs.engine.events``).
* Tenancy: every operation (with its events and artifacts) and every handed-off tracking
  session belongs to one tenant. The methods a servicer calls for a client (create, find, get,
  list, cancel, delete, list artifacts, session handoff) take ``tenant``: another tenant's
  operation is "not found" exactly as a name that does not exist (``OtherTenantError`` is an
  ``OperationNotFoundError`` with the same message; only its type tells the caller to audit the
  attempt). ``tenant=None`` on get/list/cancel/delete/list_artifacts means "any tenant": the
  job engine's own lookups by name, never a client's. A request_id is unique per tenant.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from server.auth.principal import DEFAULT_TENANT
from server.errors import shown
from server.jobs.store.notifications import Notification

__all__ = [
    "ApiKeyExistsError",
    "ApiKeyRecord",
    "TERMINAL_EVENT_TYPES",
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
    "utcnow",
]

# Event types that always end a watch stream. A final "error" is terminal too, but only the
# appender knows it is final, so it passes terminal=True.
TERMINAL_EVENT_TYPES = frozenset({"complete"})
EVENT_TYPES = frozenset({"stage_update", "progress_update", "error", "complete"})


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_session_state_args(key: str, ttl_s: float) -> None:
    """ValueError for a tracking-session state no backend stores."""
    if not key:
        raise ValueError("the session key must not be empty")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")


def check_lease_args(replica_id: str, lease_s: float) -> None:
    """ValueError for arguments no backend can claim or renew with."""
    if not replica_id:
        raise ValueError("replica_id must not be empty")
    if not lease_s > 0:
        raise ValueError(f"lease_s must be > 0, got {lease_s!r}")


class JobState(enum.IntEnum):
    """Mirror of ``framewise.v1.JobState``."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


UNFINISHED_STATES = (JobState.QUEUED, JobState.RUNNING)
TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobStoreError(Exception):
    """Base of the store's errors."""


class OperationNotFoundError(JobStoreError, KeyError):
    """No operation has this name (gRPC: NOT_FOUND)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"operation {shown(self.name)} not found"


class OtherTenantError(OperationNotFoundError):
    """The operation exists but belongs to another tenant. Its message is exactly the one of an
    unknown name (existence is not leaked); the type only lets the servicer audit the attempt."""


class OperationNotFinishedError(JobStoreError):
    """The operation is still QUEUED or RUNNING (gRPC: FAILED_PRECONDITION)."""

    def __init__(self, name: str, state: JobState) -> None:
        super().__init__(f"operation {shown(name)} is {state.name}, not finished")
        self.name = name
        self.state = state


class RequestIdConflictError(JobStoreError):
    """The request_id was already used for a different kind of job (gRPC: ALREADY_EXISTS)."""


class JobStoreUnavailableError(JobStoreError):
    """The store's server cannot be reached now (PostgreSQL down or restarting; gRPC:
    UNAVAILABLE). Nothing was committed by the call that raised it; retrying later is safe."""


class LeaseLostError(JobStoreError):
    """A write or renewal carried a lease epoch that is no longer the operation's: another
    replica took the job over (or the job finished). Nothing of the refused call was stored; the
    caller must stop working on the job (fencing)."""

    def __init__(self, name: str, epoch: int, current_epoch: int | None, owner: str | None) -> None:
        held = "nobody" if owner is None else shown(owner)
        super().__init__(
            f"lease of operation {shown(name)} lost: this write carried epoch {epoch}, "
            f"the operation is at epoch {current_epoch} held by {held}"
        )
        self.name = name
        self.epoch = epoch
        self.current_epoch = current_epoch
        self.owner = owner

    def __reduce__(self) -> tuple[type[LeaseLostError], tuple[str, int, int | None, str | None]]:
        # Crosses the job worker's pickle channel (server/jobs/worker/ipc.py) with its fields.
        return (type(self), (self.name, self.epoch, self.current_epoch, self.owner))


@dataclass(frozen=True, slots=True)
class OperationRecord:
    name: str
    kind: int  # framewise.v1.JobKind
    state: JobState
    stage: int  # framewise.v1.JobStage
    percent: float
    message: str
    # (The serialized submit request is not part of the record: JobStore.get_request.)
    # Serialized response message once SUCCEEDED, else None.
    response: bytes | None
    # (google.rpc.Code value, message) once FAILED/CANCELLED, else None.
    error: tuple[int, str] | None
    create_time: datetime
    update_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    # Sequence of the last stored event (0: none yet).
    last_sequence: int
    # Last JobStage the executor finished, so a restarted job resumes after it (0: none).
    last_completed_stage: int
    # Client-chosen idempotency key ("" or None: none).
    request_id: str | None
    cancel_requested: bool
    # The replica running (or that last ran) the job and its lease (JobStore.claim_next): the
    # epoch goes up by one at every claim; a write that carries an older one is refused. The
    # expiry is on the store's clock. None/0: never claimed.
    lease_owner: str | None = None
    lease_epoch: int = 0
    lease_expire_time: datetime | None = None
    # Who owns the operation (server.auth.principal.Principal.tenant of its submitter).
    tenant: str = DEFAULT_TENANT

    @property
    def done(self) -> bool:
        """AIP-151 ``Operation.done``."""
        return self.state.is_terminal


@dataclass(frozen=True, slots=True)
class EventRecord:
    operation: str
    sequence: int
    time: datetime
    event_type: str  # oneof member name of WatchOperationResponse.event
    payload: bytes  # serialized member message
    terminal: bool = False


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    operation: str
    name: str  # e.g. "overlay.mp4", the DownloadArtifact name
    kind: int  # framewise.v1.ArtifactKind
    media_type: str
    path: str  # absolute path on the server's disk
    size: int
    sha256: str
    expire_time: datetime | None = None


class ApiKeyExistsError(JobStoreError):
    """create_api_key was given a key id the store already holds (ids are random: a repeat is a
    bug or an attack, never a reason to overwrite the other key)."""


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key as the store holds it (server/auth/keys.py makes and checks them): never the
    key itself, only the SHA-256 of it, so a copy of the store lets nobody call the service."""

    key_id: str  # the non-secret id that is also part of the key; how a key is found and named
    tenant: str
    scopes: tuple[str, ...]
    secret_hash: str  # hex SHA-256 of the whole key string
    create_time: datetime
    expire_time: datetime | None  # None: never expires
    revoke_time: datetime | None = None  # set once by revoke_api_key; a revoked key never works again
    last_used_time: datetime | None = None  # touch_api_key: roughly when it last authenticated a call


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    """A replica the cluster knows (JobStore.register_replica): what ``framewise info`` lists."""

    replica_id: str  # --replica-id
    address: str  # where the replica listens (--listen), as it reported it
    # First registration and latest heartbeat, on the store's clock (the one clock replicas share).
    register_time: datetime
    heartbeat_time: datetime


@dataclass(frozen=True, slots=True)
class OperationUpdate:
    """Changes to apply to an operation; ``None`` leaves a field as it is.

    ``update_time`` is always set to now. Entering RUNNING sets ``start_time`` if it is unset;
    entering a terminal state sets ``end_time`` if it is unset.
    """

    state: JobState | None = None
    stage: int | None = None
    percent: float | None = None
    message: str | None = None
    response: bytes | None = None
    error: tuple[int, str] | None = None
    last_completed_stage: int | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


@runtime_checkable
class JobStore(Protocol):
    """Durable storage of operations, their numbered events and their artifacts.

    Every method is a coroutine; implementations do their I/O off the event loop. Whatever a
    method returns has been durably committed before it returns.
    """

    async def create_operation(
        self,
        *,
        kind: int,
        request: bytes,
        request_id: str | None = None,
        message: str = "",
        stage: int = 0,
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[OperationRecord, bool]:
        """Creates a QUEUED operation owned by ``tenant``, or returns the one that tenant already
        created with this ``request_id`` (another tenant's equal request_id is another key).
        Returns ``(record, created)``: ``created`` is False for a repeat, so the caller enqueues
        the job only once. Raises RequestIdConflictError when the request_id belongs to an
        operation of another kind."""
        ...

    async def find_request(self, request_id: str, kind: int, *, tenant: str = DEFAULT_TENANT) -> OperationRecord | None:
        """The operation ``tenant`` created with this ``request_id``, or None. Raises
        RequestIdConflictError when it belongs to an operation of another kind."""
        ...

    async def get_operation(self, name: str, *, tenant: str | None = None) -> OperationRecord:
        """Raises OperationNotFoundError; OtherTenantError when ``tenant`` is given and the
        operation belongs to another one."""
        ...

    async def get_request(self, name: str) -> bytes:
        """The serialized submit request (SegmentVideoRequest / CreateTalkingVideoRequest), which
        the job reads when it starts or resumes; b"" once the operation finished: an inline photo
        and audio are kept only while the job may still run. Raises OperationNotFoundError."""
        ...

    async def list_operations(
        self,
        *,
        states: JobState | tuple[JobState, ...] | None = None,
        kind: int | None = None,
        page_size: int = 50,
        page_token: str = "",
        tenant: str | None = None,
    ) -> tuple[list[OperationRecord], str]:
        """One page, ordered by (create_time, name); returns ``(items, next_page_token)`` with
        ``""`` on the last page. A token stays valid while operations are added or deleted.
        ``page_size`` <= 0 means the default (50); it is capped at 1000. With ``tenant``, only
        that tenant's operations. A token continues only the listing it came from: ValueError
        for a malformed token or one issued for another ``states``/``kind``/``tenant`` filter
        (AIP-158)."""
        ...

    async def update_operation(
        self,
        name: str,
        update: OperationUpdate | None = None,
        /,
        *,
        epoch: int | None = None,
        **fields: object,
    ) -> OperationRecord:
        """Applies ``update`` (or the same fields given as keywords) and returns the new
        record. Raises OperationNotFoundError. With ``epoch`` (the caller's lease), raises
        LeaseLostError and changes nothing unless it is still the operation's epoch."""
        ...

    async def append_event(
        self,
        name: str,
        event_type: str,
        payload: bytes,
        *,
        terminal: bool | None = None,
        update: OperationUpdate | None = None,
        epoch: int | None = None,
    ) -> EventRecord:
        """Stores an event with ``sequence = last_sequence + 1`` and bumps the operation's
        ``last_sequence`` in the same transaction (optionally applying ``update`` too, e.g. the
        stage/percent that the event reports, or the terminal state with the "complete" event).
        The event is durable when this returns; only then may it be published. ``terminal``
        defaults to ``event_type in TERMINAL_EVENT_TYPES``. ``epoch``: as in update_operation
        (a refused event takes no sequence number)."""
        ...

    async def events_after(self, name: str, after_sequence: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Stored events with sequence > after_sequence, ascending, at most ``limit``. An
        unknown operation yields []."""
        ...

    async def add_artifact(self, artifact: ArtifactRecord, *, epoch: int | None = None) -> ArtifactRecord:
        """Adds or replaces (same operation and name) an artifact. ``epoch``: as in
        update_operation."""
        ...

    async def list_artifacts(self, name: str, *, tenant: str | None = None) -> list[ArtifactRecord]:
        """Artifacts of an operation, by name; [] for an operation of another ``tenant``."""
        ...

    async def request_cancel(self, name: str, *, tenant: str | None = None) -> OperationRecord:
        """Sets ``cancel_requested`` (a no-op on a finished operation) and returns the record;
        the executor notices the flag and moves the job to CANCELLED. OtherTenantError (and
        nothing set) for an operation of another ``tenant``."""
        ...

    async def delete_operation(self, name: str, *, tenant: str | None = None) -> list[str]:
        """Deletes a finished operation with its events and artifact rows and returns the
        artifact paths for the caller to delete from disk. Raises OperationNotFoundError,
        OtherTenantError (nothing deleted) and OperationNotFinishedError."""
        ...

    async def tenant_usage(self, tenant: str) -> tuple[list[str], int, int]:
        """What ``tenant``'s operations hold: their names, and the count and total size of
        their artifacts (what storage stats and storage quotas report per tenant)."""
        ...

    async def unfinished_operations(self) -> list[OperationRecord]:
        """QUEUED and RUNNING operations by (create_time, name): what a restarted server must
        resume or re-queue."""
        ...

    async def finished_before(self, cutoff: datetime, limit: int = 500) -> list[str]:
        """Names of finished operations that ended before ``cutoff``, oldest first, at most
        ``limit``: what operation retention deletes."""
        ...

    # -- leases: many replicas (or one) running the jobs of one store ----------------------------

    async def claim_next(
        self, replica_id: str, lease_s: float, *, skip: Collection[str] = ()
    ) -> OperationRecord | None:
        """Claims the oldest (create_time, name) unfinished operation that nobody holds: QUEUED
        or RUNNING with no lease, or whose lease expired (its holder stopped renewing). Returns
        it with ``lease_owner = replica_id``, ``lease_epoch`` one more than before and the lease
        expiring ``lease_s`` from now on the store's clock; None when there is nothing to claim.
        Concurrent claimers (threads, processes, replicas) never get the same operation. The
        state is left as it is: the job's first event moves it to RUNNING.

        ``skip``: operations the caller is still running, whose lease lapsed while the store was
        out of reach for longer than the lease. The caller renews those (renew_lease accepts an
        expired lease nobody took) instead of claiming its own job a second time under a new
        epoch while the first run is alive; another replica may still take them over."""
        ...

    async def renew_lease(self, name: str, replica_id: str, epoch: int, lease_s: float) -> OperationRecord:
        """Extends the lease to ``lease_s`` from now while ``(replica_id, epoch)`` still holds it,
        even past its expiry if nobody took it meanwhile. Raises LeaseLostError once another
        claim moved the epoch on or the operation finished, OperationNotFoundError."""
        ...

    async def release_lease(self, name: str, replica_id: str, epoch: int) -> None:
        """Lets the operation be claimed at once (a replica draining hands its jobs back); a
        no-op when the lease is no longer ``(replica_id, epoch)``."""
        ...

    # -- replicas: who is in the cluster (framewise info) ---------------------------------------

    async def register_replica(self, replica_id: str, address: str) -> ReplicaRecord:
        """Adds the replica, or renews its heartbeat (and address): each replica calls it at
        start and then every few seconds. ValueError for an empty ``replica_id``."""
        ...

    async def list_replicas(self, *, seen_within_s: float | None = None) -> list[ReplicaRecord]:
        """The replicas registered, by replica_id; with ``seen_within_s``, only those whose last
        heartbeat is at most that many seconds old on the store's clock (the live ones)."""
        ...

    # -- the engine's view of the store (server/jobs/engine/queue.py) ------------------------

    # False where one replica alone uses the store (SQLite): a lease found at start was left
    # by this replica's previous process, which is gone, so the engine frees it at once.
    shared_by_replicas: bool

    async def count_waiting(self) -> int:
        """Unfinished operations that no live lease holds: the jobs waiting for a lane anywhere
        in the cluster (what ``--max-queued-jobs`` bounds)."""
        ...

    async def waiting_position(self, name: str) -> int:
        """How many waiting operations (as in count_waiting) come before this one in claim
        order; -1 when it is not waiting (held by a lease, finished, or unknown)."""
        ...

    async def try_cluster_duty(self, duty: str) -> bool:
        """Whether this store's process holds the one-per-cluster ``duty`` (operation retention,
        storage cleanup): the first caller gets it and keeps it while its connection lives, so
        the duty runs on one replica, not N racing; another replica gets it once that one is
        gone. A store only one replica can use (SQLite) always answers True."""
        ...

    # -- notifications: wake-ups from every replica sharing the store --------------------------

    def listen(self, callback: Callable[[Notification], None]) -> Callable[[], None]:
        """Registers ``callback`` for the store's notifications (server.jobs.store.notifications)
        and returns the function that unregisters it. Must be called on the event loop the
        store runs on; callbacks run there too and must not block.

        * ``EVENT(operation, sequence)``: an event was committed (by any replica). Only the
          shared backend (PostgreSQL) sends these; with SQLite (one replica) the EventBus that
          stored the event hands it to its watchers itself.
        * ``QUEUED(operation)``, ``CANCEL(operation)``, ``RELEASED(operation)``: sent by
          create_operation, request_cancel (when it set the flag) and release_lease (when it
          released), after their write committed: "work to claim", "cancel that job if you run
          it", "claimable again". Every backend sends these (SQLite: in process).
        * ``RESYNC``: notifications may have been missed (PostgreSQL: the LISTEN connection was
          (re)established, e.g. after a server restart): re-read what you wait for.

        A notification is only a hint about what to re-read: the store stays the truth, so one
        lost between RESYNCs is impossible and a duplicate is harmless. Delivered in commit
        order per replica's connection; the writing replica gets its own notifications too.
        No notification announces a lease that expired: claimers still look on a timer."""
        ...

    # -- tracking sessions handed off by a draining replica ------------------------------------

    async def put_session_state(self, key: str, state: bytes, ttl_s: float, *, tenant: str = DEFAULT_TENANT) -> None:
        """Stores a tracking session's state (server/sam2/session.py's bytes) under
        ``(tenant, key)`` for ``ttl_s`` seconds on the store's clock (the one clock replicas
        share), replacing any state stored under that key. Rows already expired are deleted on
        the way (nothing else sweeps them). ValueError for an empty key or ttl_s <= 0."""
        ...

    async def take_session_state(self, key: str, *, tenant: str = DEFAULT_TENANT) -> bytes | None:
        """Removes and returns the state ``tenant`` stored under ``key``; None when there is none
        or it expired (another tenant's state under the same key is neither returned nor
        removed). Atomic: of replicas taking the same key at once, exactly one gets the state."""
        ...

    # -- API keys (server/auth/keys.py): every replica reads them here, so a revocation holds ----
    # -- everywhere as soon as it is committed ---------------------------------------------------

    async def create_api_key(
        self,
        *,
        key_id: str,
        tenant: str,
        scopes: tuple[str, ...],
        secret_hash: str,
        expire_time: datetime | None,
    ) -> ApiKeyRecord:
        """Stores a new key (create_time now). Raises ApiKeyExistsError when ``key_id`` is
        taken; ValueError for an empty key id, tenant or hash, or a scope containing a space."""
        ...

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key with this id (revoked and expired ones included), or None."""
        ...

    async def list_api_keys(self, *, tenant: str | None = None) -> list[ApiKeyRecord]:
        """Every key (of ``tenant`` when given), by (create_time, key_id)."""
        ...

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """Sets ``revoke_time`` to now unless it is set already (revoking twice keeps the first
        time) and returns the record; None for an unknown key id."""
        ...

    async def touch_api_key(self, key_id: str) -> None:
        """Sets ``last_used_time`` to now (a no-op for an unknown key id)."""
        ...

    async def has_api_keys(self) -> bool:
        """Whether any key was ever created, revoked ones included: ``--auth auto`` requires
        credentials from then on (revoking the last key must not open the server to anyone)."""
        ...

    # -- per-tenant quotas (server/quotas/): held here, so every replica enforces the same ------

    async def set_tenant_quotas(self, tenant: str, values: Mapping[str, float | None]) -> dict[str, float]:
        """Sets (a number) or clears (None: back to the default) the tenant's overrides of the
        named quotas (server/quotas/limits.py QUOTA_NAMES) in one transaction; returns all the
        tenant's overrides after it. ValueError for an empty tenant, an unknown quota name or a
        value no quota takes (negative, not finite, a fractional count), with nothing stored."""
        ...

    async def tenant_quotas(self, tenant: str) -> dict[str, float]:
        """The tenant's overrides, by quota name ({} when it has none)."""
        ...

    async def all_tenant_quotas(self) -> dict[str, dict[str, float]]:
        """Every tenant's overrides (tenant -> quota -> value): what each replica re-reads every
        few seconds (a few rows per tenant that has any)."""
        ...

    async def acquire_quota_lease(
        self, resource: str, tenant: str, key: str, holder: str, limit: int, ttl_s: float
    ) -> tuple[bool, int]:
        """Takes one of the tenant's ``limit`` slots of ``resource`` (``"sessions"``) under
        ``key`` (the session id) for ``holder`` (the replica), lapsing ``ttl_s`` from now on the
        store's clock unless renewed. Atomic against acquirers on every replica: ``limit`` is
        never exceeded. A key the tenant holds already is renewed and moved to ``holder``
        without counting twice (a session resumed on another replica). Returns ``(granted,
        held)``: ``held`` is the tenant's live slots after the call (when refused: before it).
        ``limit`` 0: unlimited. ValueError for an empty resource, tenant or key, or ttl_s <= 0."""
        ...

    async def release_quota_lease(self, resource: str, tenant: str, key: str, holder: str) -> None:
        """Frees the slot if ``holder`` holds it (a no-op otherwise: a replica that lost a
        session to another, e.g. resumed there after a handoff, cannot free the new holder's slot)."""
        ...

    async def renew_quota_leases(
        self, resource: str, holder: str, keys: Collection[tuple[str, str]], ttl_s: float
    ) -> None:
        """The holder's periodic sync: its slots whose ``(tenant, key)`` is in ``keys`` lapse
        ``ttl_s`` from now; its other slots (sessions it no longer holds) are freed; every lapsed
        slot of ``resource`` is deleted on the way. Slots another holder took are untouched."""
        ...

    async def count_quota_leases(self, resource: str, tenant: str) -> int:
        """The tenant's live (not lapsed) slots of ``resource``."""
        ...

    async def count_tenant_jobs(self, tenant: str) -> int:
        """The tenant's QUEUED and RUNNING operations over every replica (its jobs quota)."""
        ...

    async def close(self) -> None: ...
