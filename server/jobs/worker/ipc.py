"""Messages between the serving process and its job worker process.

They travel over a socketpair the serving process creates and hands to the one child it
starts, as frames: a 4-byte big-endian length, then a pickled tuple ``(kind, *fields)``.
Pickle is safe on this channel: nothing but this program's two processes can reach it, and
it carries only our own plain values (names, the store's records, exceptions, settings).

serving process -> worker::

    ("settings", WorkerSettings)   first message: what the worker builds itself from
    ("run", name, epoch)           run the operation to its end (it may resume a RUNNING one);
                                   epoch: the serving process's lease on it, carried by every write
    ("stop", name)                 stop it where it is, writing nothing more (the lease was lost)
    ("cancel", name)               stop it; its cancel_requested flag is already stored
    ("reply", id, ok, value)       the answer to a call: its result, or the exception it raised

worker -> serving process::

    ("ready",)                     built, Triton models ready or not (the monitor follows them)
    ("call", id, method, args, kwargs)
                                   a store method, or "emit" (store the event, then publish it);
                                   see server/jobs/worker/channel.py for why the serving process
                                   does every store write
    ("done", name)                 the operation ended (or could not run: it stays in the store)
    ("metrics", bytes)             the worker's Prometheus exposition, every metrics_interval_s
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from server.config import ServerConfig

__all__ = ["MAX_FRAME_BYTES", "WorkerSettings", "read_message", "write_message"]

_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WorkerSettings:
    config: ServerConfig
    # Resolved by the serving process (a managed Triton's port is known only once started).
    triton_url: str
    triton_shm_slots: int  # 0: tensors inside gRPC messages
    metrics_interval_s: float = 2.0


def write_message(writer: asyncio.StreamWriter, *message: Any) -> None:
    """Queues one frame; the transport sends it without waiting (see drain in the callers)."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_HEADER.pack(len(data)) + data)


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message; None once the other process has closed its end (or died)."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(header)
        if size > MAX_FRAME_BYTES:
            raise ValueError(f"job worker frame of {size} bytes (limit {MAX_FRAME_BYTES})")
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
