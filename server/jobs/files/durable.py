"""Files that survive a power loss, not only a crash of the process.

The job store commits with ``synchronous=FULL``, so a stored checkpoint or artifact record
survives a power loss. The files it points at must be on disk first: a file's data reaches the
disk with its own fsync, and a rename (or a new name in a folder) with an fsync of the folder.
Without both, a resumed job could find a checkpointed stage's file empty or missing, and a
download could serve an artifact whose recorded size and sha256 no longer match.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["fsync_path", "private_temp_name", "write_atomically", "write_json_atomically"]


def fsync_path(path: Path) -> None:
    """fsync a file's data, or a folder's entries (the names created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_temp_name(path: Path) -> Path:
    """A temporary name beside ``path`` that no other writer uses.

    Two processes can write the same job file: a replica frozen past its lease wakes up and
    finishes the step the new holder is also doing (its store writes are fenced, its files in the
    shared folder are not). With one shared ``name.tmp`` the second rename found the first had
    taken the file away (FileNotFoundError) and failed the job; with a temporary file of its own
    each writer renames a complete file, and the last rename wins."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file of this writer's own (write, fsync,
    rename), so a crash leaves the old content or the new, never part of it, and concurrent
    writers never share the temporary file. The folder is not synced here: callers that store a
    checkpoint sync it once before the commit."""
    tmp = private_temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, value: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(value).encode())
