"""Stored artifact rows as the API's Artifact messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.jobs.store import ArtifactRecord

__all__ = ["artifact_proto"]


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
