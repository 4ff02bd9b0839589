"""Stored artifact rows as the API's Artifact messages, and removing artifact files."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.store import ArtifactRecord, JobStore

__all__ = ["artifact_proto", "delete_operation", "remove_files"]


def artifact_proto(record: ArtifactRecord) -> jobs_pb2.Artifact:
    artifact = jobs_pb2.Artifact(
        name=record.name,
        kind=record.kind,  # type: ignore[arg-type]
        media_type=record.media_type,
        size_bytes=record.size,
        sha256=record.sha256,
    )
    if record.expire_time is not None:
        expire = Timestamp()
        expire.FromDatetime(record.expire_time)
        artifact.expire_time.CopyFrom(expire)
    return artifact


async def delete_operation(store: JobStore, name: str, *, tenant: str | None = None) -> None:
    """A finished operation out of the store (its row, events and artifact rows), then its
    artifact files off the disk. Raises the store's OperationNotFoundError (OtherTenantError
    for an operation of another ``tenant``) and OperationNotFinishedError."""
    paths = await store.delete_operation(name, tenant=tenant)
    await asyncio.to_thread(remove_files, paths)


def remove_files(paths: Iterable[str]) -> None:
    """Deletes the files; one already gone is not an error."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
