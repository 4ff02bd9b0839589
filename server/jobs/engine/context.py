"""What a running job sees: its request, its working folder and durable state, the event
stream it reports to, model slots, artifacts and cancellation.

Every event goes through the EventBus (stored, then published), and the operation's stage,
percent and message move with it in the same transaction, so ``GetOperation`` and the watch
stream never disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.engine.admission import Admission
from server.jobs.engine.events import EventBus
from server.jobs.engine.failures import JobCancelled, JobFailure
from server.jobs.files.durable import fsync_path, write_json_atomically
from server.jobs.files.storage import StorageManager, validate_relative_path
from server.jobs.store import ArtifactRecord, JobState, OperationRecord, OperationUpdate, utcnow

__all__ = ["JobContext"]

_STATE_FILE = "state.json"


@dataclass
class JobContext:
    operation: OperationRecord
    request: Message
    bus: EventBus
    storage: StorageManager
    admission: Admission
    # Per-job folder in the "processed" tier; deleted when the job fails or is cancelled.
    workdir: Path
    # JSON-serialisable values the stages hand to each other; saved to workdir/state.json.
    state: dict[str, Any] = field(default_factory=dict)
    # The stage currently running (for error events).
    current_stage: int = jobs_pb2.JOB_STAGE_INITIALIZED
    # Failed attempts so far in the running stage (reset by the executor when a stage starts).
    failed_attempts: int = 0
    # The running Stage's checkpoint (set by the executor), and whether an event already stored it.
    checkpoint: int | None = None
    checkpoint_stored: bool = False
    cancel_requested: bool = False
    # The lease the JobQueue claimed the job with: every write below carries it, so once
    # another replica has taken the job over the store refuses them (LeaseLostError).
    epoch: int | None = None
    # Whether the folders holding the workdir have been fsynced in this run (see sync_workdir).
    workdir_entries_synced: bool = False
    artifact_paths: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.operation.name

    # ---------------------------------------------------------------- durable state

    @classmethod
    def load_state(cls, workdir: Path) -> dict[str, Any]:
        path = workdir / _STATE_FILE
        if not path.exists():
            return {}
        return json.loads(path.read_text())

    async def save_state(self, **values: Any) -> None:
        """Merges ``values`` into the state and writes it atomically (write, fsync, rename), so
        a crash leaves either the old or the new state, never half of one. The fsync runs in a
        thread: it can take tens of ms on a busy disk, and the event loop serves every watcher."""
        self.state.update(values)
        await asyncio.to_thread(write_json_atomically, self.workdir / _STATE_FILE, dict(self.state))

    async def sync_workdir(self) -> None:
        """fsyncs the working folder's entries before a checkpoint is stored. The files a stage
        leaves there are fsynced when written (``write_atomically``, ``save_state``, uploads,
        tracks.jsonl); their renames reach the disk only with the folder. Without this, a power
        loss after the checkpoint's commit could resume a job past a stage whose files are gone.
        The two folders above (processed/<id>/ and the tier) hold the entries made when the job
        started: they are synced with this run's first checkpoint."""
        folders = [self.workdir]
        if not self.workdir_entries_synced:
            folders += [self.workdir.parent, self.workdir.parent.parent]
        await asyncio.to_thread(_fsync_all, folders)
        self.workdir_entries_synced = True

    # ---------------------------------------------------------------- events

    async def stage(self, stage: int, percent: float, message: str, *, completes: bool = False, person: int = 0) -> None:
        """A stage_update event; the operation's stage/percent/message follow it.

        ``completes``: this event is the running stage's last act (its files and state are
        saved), so the stage's checkpoint is stored in the same commit. A crash can then no
        longer fall between the two and run the stage, and its events, a second time.
        ``person``: the person (1-based) the event is about in an all-persons talking video."""
        self.check_cancelled()
        self.current_stage = stage
        checkpoint = self.checkpoint if completes else None
        if checkpoint is not None:
            await self.sync_workdir()
        update = OperationUpdate(
            state=JobState.RUNNING, stage=stage, percent=percent, message=message, last_completed_stage=checkpoint
        )
        payload = jobs_pb2.StageUpdate(stage=stage, percent=percent, message=message, person=person)  # type: ignore[arg-type]
        await self.bus.emit(self.name, "stage_update", payload.SerializeToString(), update=update, epoch=self.epoch)
        if checkpoint is not None:
            self.checkpoint_stored = True

    async def progress(self, percent: float, message: str, *, done: int = 0, total: int = 0, person: int = 0) -> None:
        """A progress_update event within the current stage (``person`` as in :meth:`stage`)."""
        self.check_cancelled()
        update = OperationUpdate(percent=percent, message=message)
        payload = jobs_pb2.ProgressUpdate(
            stage=self.current_stage, percent=percent, message=message, done=done, total=total, person=person  # type: ignore[arg-type]
        )
        await self.bus.emit(self.name, "progress_update", payload.SerializeToString(), update=update, epoch=self.epoch)

    async def retrying(self, failure: JobFailure, delay_s: float) -> None:
        """An error event with will_retry=true: the client sees every retry as it happens.

        ``attempt`` counts every failed attempt in the current stage, the D-ID client's own
        retries and the executor's whole-stage retries alike, so the numbers only go up."""
        self.failed_attempts += 1
        payload = jobs_pb2.JobError(
            error_class=failure.error_class,  # type: ignore[arg-type]
            stage=self.current_stage,  # type: ignore[arg-type]
            kind=failure.kind,
            description=f"{failure.description} (attempt {self.failed_attempts}; retrying in {delay_s:.2f} s)",
            will_retry=True,
            attempt=self.failed_attempts,
            person=failure.person,
        )
        await self.bus.emit(self.name, "error", payload.SerializeToString(), terminal=False, epoch=self.epoch)

    # ---------------------------------------------------------------- slots, cancellation

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        """Holds one of the model's concurrency slots (FIFO among waiters)."""
        self.check_cancelled()
        async with self.admission.slot(model):
            yield

    def check_cancelled(self) -> None:
        if self.cancel_requested:
            raise JobCancelled(self.name)

    # ---------------------------------------------------------------- artifacts

    async def add_artifact(self, src: Path, *, name: str, kind: int, media_type: str, tier: str = "videos") -> ArtifactRecord:
        """Moves a finished file into a storage tier and records it (size, sha256, expiry). The
        same name again replaces the earlier file, so a re-run stage stays idempotent."""
        hex_name = self.name.rsplit("/", 1)[-1]
        relative = f"{hex_name}/{name}"
        placed = self.storage.tier_dir(tier).joinpath(*validate_relative_path(relative).parts)
        if not src.exists() and placed.is_file():
            # A previous run of this stage moved ``src`` into place and the process died before
            # the stage's checkpoint (kill -9 in FINALIZING). ``place`` is an atomic rename, so
            # the placed file is complete: record it instead of failing the resumed job with
            # FileNotFoundError (which then rolled back and deleted the finished video).
            size, sha256 = await asyncio.to_thread(_size_and_sha256, placed)
            await asyncio.to_thread(os.utime, placed)  # retention runs from now, as expire_time says
            dest = placed
        else:
            size, sha256 = await asyncio.to_thread(_size_and_sha256, src)
            dest = await self.storage.place(src, tier, relative)
        self.artifact_paths.append(dest)
        record = ArtifactRecord(
            operation=self.name,
            name=name,
            kind=kind,
            media_type=media_type,
            path=str(dest),
            size=size,
            sha256=sha256,
            expire_time=self.storage.expire_time(tier, utcnow()),
        )
        return await self.bus.store.add_artifact(record, epoch=self.epoch)

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _fsync_all(paths: list[Path]) -> None:
    for path in paths:
        fsync_path(path)
