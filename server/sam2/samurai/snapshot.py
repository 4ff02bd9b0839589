"""A versioned binary format for SAMURAI tracking state, pure numpy: what a draining replica writes
to the shared store and another replica reads back (see server/sam2/session.py).

Layout of one snapshot (all integers little-endian):

    magic    8 bytes   b"FWTRACK\\0"
    version  uint16    FORMAT_VERSION
    length   uint32    bytes of the header that follows
    header   JSON      UTF-8; arrays appear in it as {"array": i}, the i-th array below
    arrays   .npy      numpy's own array format (dtype, shape, order + raw data), one after another

No pickle anywhere: the store is shared by every replica, and unpickling runs code. numpy reads
the arrays with ``allow_pickle=False``, so an object array in a snapshot is refused, not executed.
Floats in the header are JSON numbers, which Python writes with repr and reads back to the same
double; the arrays are stored as their bytes. A round trip is therefore exact.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from typing import Any

import numpy as np

from server.sam2.samurai.memory_bank import BankState, MemoryBank
from server.sam2.samurai.selection import CandidateSelector, SamuraiConfig

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "ArrayTable",
    "SnapshotError",
    "bank_from_json",
    "bank_to_json",
    "config_from_json",
    "config_to_json",
    "pack",
    "selector_from_json",
    "selector_to_json",
    "unpack",
]

MAGIC = b"FWTRACK\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHI")
# A header describes objects and frame numbers, never array data: a few KiB. Anything far beyond
# is not a snapshot this code wrote.
_MAX_HEADER_BYTES = 16 * 1024 * 1024


class SnapshotError(ValueError):
    """The bytes are not a tracking snapshot this code can read."""


class ArrayTable:
    """Arrays referenced from a JSON header by position."""

    def __init__(self, arrays: list[np.ndarray] | None = None) -> None:
        self.arrays: list[np.ndarray] = [] if arrays is None else arrays

    def add(self, array: np.ndarray) -> dict[str, int]:
        self.arrays.append(np.asarray(array))
        return {"array": len(self.arrays) - 1}

    def get(self, ref: Any) -> np.ndarray:
        if not isinstance(ref, dict) or not isinstance(ref.get("array"), int) or not 0 <= ref["array"] < len(self.arrays):
            raise SnapshotError(f"bad array reference {str(ref)[:80]!r}")
        return self.arrays[ref["array"]]


def pack(header: dict[str, Any], arrays: ArrayTable) -> bytes:
    """The snapshot bytes of ``header`` (JSON-able, arrays referenced through ``arrays``)."""
    text = json.dumps({**header, "array_count": len(arrays.arrays)}, separators=(",", ":"), allow_nan=False).encode()
    out = io.BytesIO()
    out.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(text)))
    out.write(text)
    for array in arrays.arrays:
        np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def unpack(blob: bytes) -> tuple[dict[str, Any], ArrayTable]:
    """The header and arrays of a snapshot; SnapshotError for anything else, including a format
    version this code does not know (a newer replica's snapshot is refused, never misread)."""
    if len(blob) < _PREFIX.size:
        raise SnapshotError(f"{len(blob)} bytes is too short for a tracking snapshot")
    magic, version, length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise SnapshotError("not a tracking snapshot (wrong magic bytes)")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"tracking snapshot format version {version} is not supported (this code reads version {FORMAT_VERSION})")
    if length > min(_MAX_HEADER_BYTES, len(blob) - _PREFIX.size):
        raise SnapshotError(f"tracking snapshot header of {length} bytes does not fit in {len(blob)} bytes")
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotError(f"tracking snapshot header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SnapshotError("tracking snapshot header is not a JSON object")
    count = header.get("array_count")
    if not isinstance(count, int) or count < 0:
        raise SnapshotError("tracking snapshot header has no array_count")
    stream = io.BytesIO(memoryview(blob)[_PREFIX.size + length :])
    arrays = []
    for i in range(count):
        try:
            arrays.append(np.lib.format.read_array(stream, allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise SnapshotError(f"tracking snapshot array {i} of {count} is unreadable: {exc}") from None
    if stream.read(1):
        raise SnapshotError("tracking snapshot has bytes after its last array")
    return header, ArrayTable(arrays)


# ---- the SAMURAI parts ------------------------------------------------------------------------------


def config_to_json(config: SamuraiConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_json(data: Any) -> SamuraiConfig:
    known = {f.name for f in dataclasses.fields(SamuraiConfig)}
    if not isinstance(data, dict) or set(data) - known:
        raise SnapshotError(f"tracking snapshot config has unknown fields: {sorted(set(data) - known) if isinstance(data, dict) else data!r}")
    try:
        return SamuraiConfig(**data)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"tracking snapshot config is invalid: {exc}") from None


def selector_to_json(selector: CandidateSelector, arrays: ArrayTable) -> dict[str, Any]:
    """The Kalman state (mean [8], covariance [8, 8], float64) and the warm-up counter."""
    return {
        "mean": None if selector.mean is None else arrays.add(selector.mean),
        "covariance": None if selector.covariance is None else arrays.add(selector.covariance),
        "stable_frames": selector.stable_frames,
        "box_space": None if selector.box_space is None else list(selector.box_space),
    }


def selector_from_json(data: dict[str, Any], config: SamuraiConfig, arrays: ArrayTable) -> CandidateSelector:
    box_space = data["box_space"]
    selector = CandidateSelector(config, box_space=None if box_space is None else (int(box_space[0]), int(box_space[1])))
    selector.mean = None if data["mean"] is None else arrays.get(data["mean"])
    selector.covariance = None if data["covariance"] is None else arrays.get(data["covariance"])
    selector.stable_frames = int(data["stable_frames"])
    return selector


def bank_to_json(bank: MemoryBank, arrays: ArrayTable) -> dict[str, Any]:
    """Memories as stored (their dtype and shape), pointers, frame indices, usable verdicts."""
    state = bank.export()
    return {
        "conditioning": [[t, arrays.add(m), arrays.add(p)] for t, m, p in state.conditioning],
        "memories": [[t, arrays.add(m), usable] for t, m, usable in state.memories],
        "pointers": [[t, arrays.add(p)] for t, p in state.pointers],
        "first_conditioning": state.first_conditioning,
        "last_frame": state.last_frame,
    }


def bank_from_json(data: dict[str, Any], config: SamuraiConfig, arrays: ArrayTable) -> MemoryBank:
    state = BankState(
        conditioning=[(int(t), arrays.get(m), arrays.get(p)) for t, m, p in data["conditioning"]],
        memories=[(int(t), arrays.get(m), bool(usable)) for t, m, usable in data["memories"]],
        pointers=[(int(t), arrays.get(p)) for t, p in data["pointers"]],
        first_conditioning=data["first_conditioning"],
        last_frame=data["last_frame"],
    )
    return MemoryBank.restore(config, state)
