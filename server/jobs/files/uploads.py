"""Chunked client uploads (the ``UploadFile`` RPC) and server-side media paths.

An upload is streamed into a temp-tier file while its sha256 is computed, checked against the
header (exact size, exact hash), and only then placed as ``uploads/<upload id>/data`` next to a
``meta.json``. Whatever goes wrong, including the client going away (cancellation), the partial
file is removed: nothing half-received is ever visible under ``uploads/``.

A job that reads an upload should ``storage.keep(info.path.parent)`` while it runs, so the
uploads retention cannot remove the file under it.

An upload belongs to the tenant that sent it (``meta.json``'s ``tenant``; one written before
tenancy belongs to the default tenant). ``get``/``delete`` with a ``tenant`` answer another
tenant's upload exactly as one that does not exist (``UploadOfOtherTenant``, a subclass the
servicer audits); without one they are the job's own lookups, after its submit was checked.

The gRPC servicer maps the exceptions to status codes: ``UploadInvalid`` -> INVALID_ARGUMENT,
``UploadTooLarge`` and ``UploadNoSpace`` (the disk filled up) -> RESOURCE_EXHAUSTED,
``UploadNotFound`` -> NOT_FOUND, with ``field`` as the BadRequest field violation.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc

from server.auth.principal import DEFAULT_TENANT
from server.errors import FieldViolation, InvalidInput, ServiceError, TooLarge, shown
from server.jobs.files.storage import StorageManager, validate_relative_path

__all__ = [
    "UploadError",
    "UploadInfo",
    "UploadInvalid",
    "UploadNoSpace",
    "UploadNotFound",
    "UploadOfOtherTenant",
    "UploadStore",
    "UploadTooLarge",
    "resolve_server_path",
    "tenant_media_root",
]

log = logging.getLogger("server.jobs.files.uploads")

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
# A tenant's media folder name: one path component, no dot-only names.
_TENANT_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_FILENAME_CHARS = 1024
_DATA_NAME = "data"
_META_NAME = "meta.json"

_T = TypeVar("_T")


class UploadError(Exception):
    """An upload or media-path problem; ``field`` names the request field at fault."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class UploadInvalid(UploadError):
    pass


class UploadTooLarge(UploadError):
    pass


class UploadNotFound(UploadError):
    pass


class UploadOfOtherTenant(UploadNotFound):
    """The upload exists but another tenant sent it: worded exactly as an unknown upload."""


class UploadNoSpace(UploadError):
    """The server's disk (or quota) filled up while storing the upload: not the caller's fault."""


@dataclass(frozen=True)
class UploadInfo:
    upload_id: str
    kind: int  # framewise.v1.FileKind value
    filename: str  # informational only, never used as a path
    size_bytes: int
    sha256: str
    path: Path  # the data file
    create_time: datetime
    expire_time: datetime
    tenant: str = DEFAULT_TENANT


class UploadStore:
    """Receives, looks up and deletes uploads in the storage's ``uploads`` tier."""

    def __init__(self, storage: StorageManager, *, max_bytes: int, flush_bytes: int = 1 << 20) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if flush_bytes < 1:
            raise ValueError("flush_bytes must be positive")
        self._storage = storage
        self._max_bytes = max_bytes
        # Chunks are written (and hashed) in a thread in batches of about this size, so
        # neither the disk nor the hash holds up the event loop.
        self._flush_bytes = flush_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    async def receive(
        self,
        kind: int,
        filename: str,
        size_bytes: int,
        sha256: str,
        chunks: AsyncIterator[bytes],
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> UploadInfo:
        """Validates the header, streams ``chunks`` to disk and commits the upload once the
        exact size and sha256 match. Raises UploadInvalid / UploadTooLarge before reading a
        single chunk when the header is wrong, and as soon as more bytes arrive than declared."""
        expected_sha = self._check_header(kind, filename, size_bytes, sha256)
        upload_id = uuid.uuid4().hex
        temp = self._storage.temp_path(".upload")
        meta_temp = self._storage.temp_path(".json")
        upload_dir = self._storage.tier_dir("uploads") / upload_id
        try:
            actual_sha = await self._stream(temp, size_bytes, chunks)
            if actual_sha != expected_sha:
                raise UploadInvalid(
                    f"sha256 mismatch: header.sha256 is {expected_sha}, the received bytes hash to {actual_sha}",
                    field="header.sha256",
                )
            create_time = datetime.now(UTC)
            meta = {
                "upload_id": upload_id,
                "kind": kind,
                "filename": filename,
                "size_bytes": size_bytes,
                "sha256": actual_sha,
                "create_time": create_time.isoformat(),
                "tenant": tenant,
            }
            await _uninterruptible(asyncio.to_thread(_write_json, meta_temp, meta))
            data = await _uninterruptible(self._storage.place(temp, "uploads", f"{upload_id}/{_DATA_NAME}"))
            # meta.json last: get() needs it, so a half-committed upload is never found.
            await _uninterruptible(self._storage.place(meta_temp, "uploads", f"{upload_id}/{_META_NAME}"))
        except BaseException as exc:
            await _uninterruptible(asyncio.to_thread(_discard, temp, meta_temp, upload_dir))
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("upload refused: the storage is out of space", extra={"error": str(exc)})
                raise UploadNoSpace(
                    f"the server ran out of disk space while storing the upload ({exc.strerror}); nothing was kept. "
                    "Retry later: an operator must free space on the server",
                    field="",
                ) from None
            raise
        log.info("upload %s received: kind %d, %d bytes, sha256 %s", upload_id, kind, size_bytes, actual_sha)
        return UploadInfo(
            upload_id=upload_id,
            kind=kind,
            filename=filename,
            size_bytes=size_bytes,
            sha256=actual_sha,
            path=data,
            create_time=create_time,
            expire_time=self._storage.expire_time("uploads", create_time),
            tenant=tenant,
        )

    def _check_header(self, kind: int, filename: str, size_bytes: int, sha256: str) -> str:
        if kind <= 0:
            raise UploadInvalid("header.kind must be set (FILE_KIND_VIDEO, _IMAGE or _AUDIO)", field="header.kind")
        if len(filename) > _MAX_FILENAME_CHARS or "\x00" in filename:
            raise UploadInvalid(
                f"header.filename must be at most {_MAX_FILENAME_CHARS} characters without NUL",
                field="header.filename",
            )
        if size_bytes < 1:
            raise UploadInvalid(f"header.size_bytes must be positive, got {size_bytes}", field="header.size_bytes")
        if size_bytes > self._max_bytes:
            raise UploadTooLarge(
                f"header.size_bytes {size_bytes} exceeds the server's upload limit of {self._max_bytes} bytes",
                field="header.size_bytes",
            )
        digest = sha256.strip().lower()
        if _SHA256.fullmatch(digest) is None:
            raise UploadInvalid("header.sha256 must be 64 hex characters", field="header.sha256")
        return digest

    async def _stream(self, temp: Path, size_bytes: int, chunks: AsyncIterator[bytes]) -> str:
        """Writes the chunks to ``temp`` (fsynced) and returns their sha256 hex digest."""
        # Opened on the loop (a local create is quick): opened in a thread, a cancellation could
        # leave the thread creating the file after the caller's cleanup already ran.
        handle = open(temp, "xb")  # noqa: ASYNC230, SIM115 - closed in the finally below
        try:
            hasher = hashlib.sha256()
            received = 0
            batch: list[bytes] = []
            batch_bytes = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                received += len(chunk)
                if received > size_bytes:
                    raise UploadInvalid(
                        f"received more bytes than header.size_bytes ({size_bytes})", field="header.size_bytes"
                    )
                batch.append(chunk)
                batch_bytes += len(chunk)
                if batch_bytes >= self._flush_bytes:
                    await _uninterruptible(asyncio.to_thread(_write_batch, handle, hasher, batch))
                    batch, batch_bytes = [], 0
            if received < size_bytes:
                raise UploadInvalid(
                    f"received {received} bytes but header.size_bytes is {size_bytes}", field="header.size_bytes"
                )
            await _uninterruptible(asyncio.to_thread(_write_batch, handle, hasher, batch, sync=True))
            return hasher.hexdigest()
        finally:
            await _uninterruptible(asyncio.to_thread(handle.close))

    async def get(self, upload_id: str, *, tenant: str | None = None) -> UploadInfo:
        """The upload; UploadNotFound when there is none, or (``UploadOfOtherTenant``, same
        message) when ``tenant`` is given and another tenant sent it."""
        upload_dir = self._upload_dir(upload_id)
        try:
            meta = await asyncio.to_thread(_read_meta, upload_dir)
            create_time = datetime.fromisoformat(meta["create_time"])
            info = UploadInfo(
                upload_id=upload_id,
                kind=int(meta["kind"]),
                filename=str(meta["filename"]),
                size_bytes=int(meta["size_bytes"]),
                sha256=str(meta["sha256"]),
                path=upload_dir / _DATA_NAME,
                create_time=create_time,
                expire_time=self._storage.expire_time("uploads", create_time),
                tenant=str(meta.get("tenant", DEFAULT_TENANT)),
            )
        except FileNotFoundError:
            raise UploadNotFound(_not_found(upload_id), field="upload_id") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("upload %s has unreadable metadata: %s", upload_id, exc)
            raise UploadNotFound(f"upload {shown(upload_id)} not found (unreadable metadata)", field="upload_id") from exc
        if tenant is not None and info.tenant != tenant:
            raise UploadOfOtherTenant(_not_found(upload_id), field="upload_id")
        return info

    async def owned(self, tenant: str) -> list[str]:
        """The ids of the uploads ``tenant`` sent (what its storage stats count)."""
        return await asyncio.to_thread(self._owned_sync, tenant)

    def _owned_sync(self, tenant: str) -> list[str]:
        ids: list[str] = []
        with os.scandir(self._storage.tier_dir("uploads")) as entries:
            for entry in entries:
                if _UPLOAD_ID.fullmatch(entry.name) is None:
                    continue
                try:
                    meta = _read_meta(Path(entry.path))
                except (OSError, ValueError, TypeError):
                    continue  # half-written or expiring: nobody's yet
                if str(meta.get("tenant", DEFAULT_TENANT)) == tenant:
                    ids.append(entry.name)
        return sorted(ids)

    async def delete(self, upload_id: str, *, tenant: str | None = None) -> None:
        """Removes the upload; UploadNotFound when there is none (or it is another ``tenant``'s)."""
        if tenant is not None:
            await self.get(upload_id, tenant=tenant)
        upload_dir = self._upload_dir(upload_id)
        try:
            await asyncio.to_thread(shutil.rmtree, upload_dir)
        except FileNotFoundError:
            raise UploadNotFound(f"upload {shown(upload_id)} not found", field="upload_id") from None

    def _upload_dir(self, upload_id: str) -> Path:
        if _UPLOAD_ID.fullmatch(upload_id) is None:
            raise UploadInvalid("upload_id must be 32 lowercase hex characters", field="upload_id")
        return self._storage.tier_dir("uploads") / upload_id


def _not_found(upload_id: str) -> str:
    return f"upload {shown(upload_id)} not found (never received, expired or deleted)"


def tenant_media_root(root: Path | None, tenant: str, *, authenticated: bool) -> Path | None:
    """Where ``server_path`` resolves for a caller: ``<root>/<tenant>/`` once callers
    authenticate, so one tenant's server-side media is out of another's reach; the root itself
    for the anonymous caller of a server without authentication (one team: the layout it always
    had). UploadInvalid for a tenant name that cannot be one folder name."""
    if root is None or not authenticated:
        return root
    if not _TENANT_FOLDER.fullmatch(tenant):
        raise UploadInvalid("server-side paths are not available to this tenant (its name is not a folder name)", field="server_path")
    return root / tenant


def resolve_server_path(root: Path | None, relative: str) -> Path:
    """Maps ``SegmentVideoRequest.server_path`` to a regular file inside the media root.

    Symlinks are followed (``Path.resolve``) before the containment check, so a link inside the
    root that points outside it is refused like a literal "..". Returns the resolved path."""
    if root is None:
        raise UploadInvalid("server-side paths are disabled; start the server with --media-root", field="server_path")
    try:
        validate_relative_path(relative)
    except ValueError as exc:
        raise UploadInvalid(f"server_path {shown(relative)}: {exc}", field="server_path") from None
    base = root.resolve()
    try:
        candidate = (base / relative).resolve()
        if not candidate.is_relative_to(base):
            raise UploadInvalid(f"server_path {shown(relative)} resolves outside the media root", field="server_path")
        if not candidate.is_file():
            raise UploadNotFound(f"server_path {shown(relative)} does not exist or is not a regular file", field="server_path")
    except RuntimeError:  # Python 3.11's Path.resolve reports a symlink loop this way
        raise UploadInvalid(f"server_path {shown(relative)} cannot name a file: it loops through symlinks", field="server_path") from None
    except OSError as exc:
        # The path itself is at fault (a part over NAME_MAX, the whole over PATH_MAX, a symlink
        # loop): the caller must change it. The OS message is not quoted: it holds the full path.
        if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            why = "a part of it or the whole is too long" if exc.errno == errno.ENAMETOOLONG else "it loops through symlinks"
            raise UploadInvalid(f"server_path {shown(relative)} cannot name a file: {why}", field="server_path") from None
        raise UploadNotFound(
            f"server_path {shown(relative)} cannot be read ({exc.strerror})", field="server_path"
        ) from None
    return candidate


async def _uninterruptible(work: Awaitable[_T]) -> _T:
    """Awaits ``work`` (file operations in a thread) so that a cancellation arriving
    meanwhile is raised only after the work has finished: a thread cannot be stopped, and the
    cleanup that follows a cancellation must not race a write or a rename still in flight. A
    second cancellation stops the waiting; the work still completes in the background."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller gets
        raise


def _write_batch(handle: BinaryIO, hasher: hashlib._Hash, batch: list[bytes], *, sync: bool = False) -> None:
    for chunk in batch:
        hasher.update(chunk)
        handle.write(chunk)
    if sync:
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, value: dict[str, object]) -> None:
    with open(path, "x", encoding="utf-8") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _read_meta(upload_dir: Path) -> dict[str, Any]:
    if not (upload_dir / _DATA_NAME).is_file():
        raise FileNotFoundError(upload_dir / _DATA_NAME)
    meta = json.loads((upload_dir / _META_NAME).read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise TypeError("meta.json is not an object")
    return meta


def _discard(temp: Path, meta_temp: Path, upload_dir: Path) -> None:
    temp.unlink(missing_ok=True)
    meta_temp.unlink(missing_ok=True)
    shutil.rmtree(upload_dir, ignore_errors=True)


def upload_status(exc: UploadError, field: str | None = None) -> ServiceError:
    """An upload error as the API's status: NOT_FOUND for an unknown or expired upload,
    RESOURCE_EXHAUSTED over the size limit or on a full disk, INVALID_ARGUMENT otherwise; ``field`` names the
    request field the caller knows (audio_upload_id), else the error's own."""
    name = field or exc.field
    if isinstance(exc, UploadNoSpace):
        return ServiceError(str(exc), code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=60.0)
    if isinstance(exc, UploadNotFound):
        return ServiceError(str(exc), [FieldViolation(name, str(exc))] if name else [], grpc.StatusCode.NOT_FOUND)
    if isinstance(exc, UploadTooLarge):
        return TooLarge(str(exc), name)
    return InvalidInput(str(exc), name)
