"""Request slots in POSIX shared memory for a co-located Triton.

A detection request moves a 1.2 MB input and a 2.8 MB output; through gRPC both are copied and
serialised on each side, on the same CPU the model needs. With a shared region, the orchestrator
writes the letterboxed frame straight into shared memory and reads the head from it: Triton
gets offsets instead of bytes. Only possible when Triton runs on the same host and sees the same
/dev/shm (the managed child does), so it is optional and falls back to plain gRPC per request
when every slot is busy.

A slot's pages stay resident once written: a session that tracked four objects leaves its slots
holding four objects' rows after it ends. ``release_idle_pages`` gives the pages of slots that have
been free for a while back to the system (the runner calls it on a timer), so a burst does not set
the process's memory for good.

A region is named after its owner process (PID namespace, PID and the process's start time):
close() unlinks it, and if the interpreter exits without it multiprocessing's resource tracker
does, but a SIGKILL of the orchestrator together with its tracker (a container or process-group
kill) leaves it in /dev/shm for good. reclaim_orphaned_regions(), run before a process makes its
first region, unlinks the regions whose owner is dead, and never one of a live process.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from server.triton.model_spec import TensorSpec

log = logging.getLogger(__name__)

_ALIGN = 64
_NUMPY = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64}


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _whole_pages(start: int, end: int) -> tuple[int, int]:
    """The pages that lie entirely inside [start, end): a neighbouring slot's bytes on a shared
    page must never be dropped."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    return first, max(first, end // mmap.PAGESIZE * mmap.PAGESIZE)


SHM_DIR = Path("/dev/shm")
# framewise-<model>-<pid namespace>.<pid>.<start time>-<random>
_REGION = re.compile(r"framewise-(?P<model>.+)-(?P<ns>\d+)\.(?P<pid>\d+)\.(?P<start>\d+)-[0-9a-f]{8}")


@dataclass(frozen=True)
class RegionOwner:
    """The process a region belongs to. The start time tells a dead owner from a new process
    that got its PID again; the PID namespace keeps a process from judging regions of another
    container that shares /dev/shm (its PIDs mean nothing here)."""

    pid_namespace: int
    pid: int
    start_ticks: int

    @classmethod
    def current(cls, proc: Path = Path("/proc")) -> RegionOwner | None:
        """This process; None when /proc cannot say."""
        try:
            namespace = os.stat(proc / "self" / "ns" / "pid").st_ino
        except OSError:
            return None
        start = start_ticks(os.getpid(), proc)
        return None if start is None else cls(namespace, os.getpid(), start)

    @property
    def tag(self) -> str:
        return f"{self.pid_namespace}.{self.pid}.{self.start_ticks}"


def start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """When process ``pid`` of this PID namespace started (clock ticks after boot), None when
    there is no such live process."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    if fields[0] == "Z":  # exited, not yet reaped: dead for our purpose
        return None
    return int(fields[19])  # field 22 of stat


def region_name(model: str, owner: RegionOwner | None) -> str:
    tag = owner.tag if owner is not None else f"0.{os.getpid()}.0"  # no /proc: never reclaimed
    return f"framewise-{model}-{tag}-{uuid.uuid4().hex[:8]}"


def reclaim_orphaned_regions(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc")) -> list[str]:
    """Unlinks the regions in ``shm_dir`` whose owner process is dead and returns their names.
    A region of a live process, of another PID namespace, or named otherwise is left alone;
    without /proc nothing is touched (the dead cannot be told from the living)."""
    me = RegionOwner.current(proc)
    if me is None:
        return []
    reclaimed = []
    try:
        entries = list(shm_dir.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = _REGION.fullmatch(entry.name)
        if match is None or int(match["ns"]) != me.pid_namespace:
            continue
        if start_ticks(int(match["pid"]), proc) == int(match["start"]):
            continue  # its owner is alive
        try:
            entry.unlink()
        except FileNotFoundError:
            continue  # another process starting at the same time reclaimed it first
        except PermissionError:
            continue  # another user's (sticky /dev/shm); not ours to judge
        log.warning("reclaimed a shared-memory region of a dead process", extra={"region": entry.name})
        reclaimed.append(entry.name)
    return reclaimed


@dataclass(frozen=True)
class ShmRef:
    """A tensor that already sits in a registered region: another call's output, passed to the
    next model by offset instead of by value."""

    region: str
    offset: int
    shape: tuple[int, ...]
    datatype: str
    buffer: memoryview

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(_NUMPY[self.datatype]).itemsize

    def array(self) -> np.ndarray:
        """A numpy view (no copy), valid while the slot holding it is held."""
        return np.ndarray(self.shape, _NUMPY[self.datatype], buffer=self.buffer, offset=self.offset)

    def block(self, index: tuple[int, ...]) -> ShmRef:
        """The sub-tensor at a leading index, keeping the dimensions as size 1 (e.g. candidate k
        of masks [1, 4, H, W] as [1, 1, H, W]): contiguous in C order, so still a plain offset."""
        inner = self.shape[len(index) :]
        strides = np.cumprod((1, *reversed(self.shape)))[::-1][1:]  # elements per step of each dim
        offset = int(sum(i * s for i, s in zip(index, strides[: len(index)], strict=True)))
        itemsize = np.dtype(_NUMPY[self.datatype]).itemsize
        return ShmRef(self.region, self.offset + offset * itemsize, (1,) * len(index) + inner, self.datatype, self.buffer)


@dataclass(frozen=True)
class ShmTensor:
    """One tensor of one slot: where it lives in the region and the largest shape it can hold."""

    name: str
    region: str
    datatype: str
    shape: tuple[int, ...]  # capacity; with the batch dimension (1) for a batching model
    offset: int
    capacity: int  # bytes
    buffer: memoryview

    def ref(self, shape: tuple[int, ...] | None = None) -> ShmRef:
        return ShmRef(self.region, self.offset, shape or self.shape, self.datatype, self.buffer)

    def view(self, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """The tensor as numpy, in place (no copy); `shape` for a smaller dynamic-shape tensor."""
        return np.ndarray(shape or self.shape, _NUMPY[self.datatype], buffer=self.buffer, offset=self.offset)

    def nbytes_for(self, shape: tuple[int, ...]) -> int:
        return int(np.prod(shape)) * np.dtype(_NUMPY[self.datatype]).itemsize

    def holds(self, array: np.ndarray) -> bool:
        return self.holds_shape(array.shape, array.dtype)

    def holds_shape(self, shape: tuple[int, ...], dtype: np.dtype) -> bool:
        return (
            dtype == _NUMPY[self.datatype]
            and len(shape) == len(self.shape)
            and all(0 <= d <= cap for d, cap in zip(shape, self.shape, strict=True))
        )


@dataclass(frozen=True)
class ShmSlot:
    index: int
    region: str
    inputs: dict[str, ShmTensor]
    outputs: dict[str, ShmTensor]
    # Input name -> {row: weak reference to the one-row array last written there}: a stacked
    # input whose part at a row is still that very array (a tracked object's memory, unchanged
    # since its previous frame used this slot) is not copied again. Weak, so the slot keeps no
    # session's memories alive; Triton never writes into input tensors.
    written: dict[str, dict[int, weakref.ref]] = field(default_factory=dict, compare=False, repr=False)


class ShmSlotPool:
    """`slots` request slots for one model, in one shared-memory region registered with Triton.

    Each tensor gets room for its largest shape: the spec's shape with a batch of one (batching
    models), and for dynamic dimensions the limits in `max_shapes` (tensor name -> shape). A
    request whose inputs fit is sent by offset and actual size; one that does not goes by gRPC.
    """

    def __init__(
        self,
        model: str,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        slots: int,
        *,
        batched: bool,
        max_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.model = model
        self.region = region_name(model, RegionOwner.current())
        layout, slot_bytes = self._layout(inputs + outputs, batched, max_shapes or {})
        self.slot_bytes = slot_bytes
        self.byte_size = slot_bytes * slots
        # close() unlinks the region; if the interpreter exits without it, multiprocessing's
        # resource tracker unlinks it. Only a SIGKILL of the orchestrator leaves it behind.
        self._shm = shared_memory.SharedMemory(name=self.region, create=True, size=self.byte_size)
        # A second mapping of the same file, for madvise (SharedMemory does not expose its own):
        # address space only, no memory.
        fd = os.open(SHM_DIR / self.region, os.O_RDWR)
        try:
            self._pages = mmap.mmap(fd, self.byte_size)
        finally:
            os.close(fd)
        # Slot index -> when it was last released; and the slots written since their pages were
        # last given back.
        self._idle_since: dict[int, float] = {}
        self._resident: set[int] = set()
        input_names = {t.name for t in inputs}
        self._slots = []
        for index in range(slots):
            base = index * slot_bytes
            tensors = {
                spec.name: ShmTensor(spec.name, self.region, spec.datatype, shape, base + offset, nbytes, self._shm.buf)
                for spec, shape, offset, nbytes in layout
            }
            self._slots.append(
                ShmSlot(
                    index,
                    self.region,
                    {k: v for k, v in tensors.items() if k in input_names},
                    {k: v for k, v in tensors.items() if k not in input_names},
                )
            )
        self._free = list(reversed(self._slots))

    @staticmethod
    def capacity_shape(
        spec: TensorSpec, batched: bool, max_shapes: Mapping[str, tuple[int, ...]]
    ) -> tuple[int, ...] | None:
        """The largest shape a slot holds for this tensor, or None when it has no bound."""
        if spec.datatype not in _NUMPY:
            return None
        shape = tuple(max_shapes.get(spec.name, (1, *spec.shape[1:]) if batched else spec.shape))
        return shape if len(shape) == len(spec.shape) and all(d >= 0 for d in shape) else None

    @classmethod
    def supports(
        cls, tensors: tuple[TensorSpec, ...], *, batched: bool, max_shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> bool:
        """Every tensor numeric with a bounded shape. For a batching model (max_batch_size > 0) the
        first dimension is the batch and a slot holds a batch of one; otherwise every dynamic
        dimension needs a limit in `max_shapes`."""
        return all(cls.capacity_shape(t, batched, max_shapes or {}) is not None for t in tensors)

    def fits(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether these input arrays fit a slot (a batch of one, within every dimension's room)."""
        return self.fits_shapes({n: a.shape for n, a in inputs.items()}, {n: a.dtype for n, a in inputs.items()})

    def fits_shapes(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype]) -> bool:
        slot = self._slots[0] if self._slots else None
        return slot is not None and all(
            name in slot.inputs and slot.inputs[name].holds_shape(shape, dtypes[name]) for name, shape in shapes.items()
        )

    @property
    def key(self) -> str:
        """The shm_open key Triton maps."""
        return f"/{self.region}"

    @classmethod
    def _layout(
        cls, tensors: tuple[TensorSpec, ...], batched: bool, max_shapes: Mapping[str, tuple[int, ...]]
    ) -> tuple[list[tuple[TensorSpec, tuple[int, ...], int, int]], int]:
        layout, offset = [], 0
        for spec in tensors:
            shape = cls.capacity_shape(spec, batched, max_shapes)
            if shape is None:
                raise ValueError(f"{spec.name}: shared memory needs a bounded shape and a numeric type, got {spec}")
            nbytes = int(np.prod(shape)) * np.dtype(_NUMPY[spec.datatype]).itemsize
            layout.append((spec, shape, offset, nbytes))
            offset += _aligned(nbytes)
        return layout, offset

    def acquire(self, prefer: int | None = None) -> ShmSlot | None:
        """A free slot (slot ``prefer`` when it is free), or None when all are in use (the caller
        then sends bytes over gRPC)."""
        slot = None
        if prefer is not None:
            for k in range(len(self._free) - 1, -1, -1):
                if self._free[k].index == prefer:
                    slot = self._free.pop(k)
                    break
        if slot is None and self._free:
            slot = self._free.pop()
        if slot is not None:
            self._idle_since.pop(slot.index, None)
            self._resident.add(slot.index)
        return slot

    def release(self, slot: ShmSlot, now: float | None = None) -> None:
        self._idle_since[slot.index] = time.monotonic() if now is None else now
        self._free.append(slot)

    def _free_with_pages(self) -> list[tuple[ShmSlot, float]]:
        """The free slots written since their pages were last given back, with when each was released."""
        return [(slot, self._idle_since[slot.index]) for slot in self._free
                if slot.index in self._resident and slot.index in self._idle_since]

    def release_idle_pages(self, idle_s: float, now: float | None = None) -> int:
        """Gives back the pages of every slot free for at least ``idle_s`` seconds and written
        since its pages were last given back; returns the bytes the region held less. Safe only
        because a free slot is in no request: Triton reads and writes a slot only while a request
        holds it (an abandoned request's slot is released only after its quarantine). The slot
        reads as zeros afterwards, so it forgets which rows it held (see ShmSlot.written)."""
        now = time.monotonic() if now is None else now
        idle = [slot for slot, since in self._free_with_pages() if now - since >= idle_s]
        if not idle:
            return 0
        # What the file held before and after: only the pages that were written count.
        before = self.allocated_bytes()
        for slot in idle:
            start, end = _whole_pages(slot.index * self.slot_bytes, (slot.index + 1) * self.slot_bytes)
            if end > start:
                self._pages.madvise(mmap.MADV_REMOVE, start, end - start)
            slot.written.clear()
            self._resident.discard(slot.index)
        return max(0, before - self.allocated_bytes())

    def allocated_bytes(self) -> int:
        """The bytes of the region that hold pages (tmpfs allocates a page when it is written)."""
        return os.stat(SHM_DIR / self.region).st_blocks * 512

    def next_idle_release_s(self, idle_s: float, now: float | None = None) -> float | None:
        """Seconds until release_idle_pages would give back another slot's pages; None while
        no free slot holds written pages."""
        now = time.monotonic() if now is None else now
        waits = [idle_s - (now - since) for _, since in self._free_with_pages()]
        return max(0.0, min(waits)) if waits else None

    def close(self) -> None:
        self._slots.clear()
        self._free.clear()
        self._pages.close()
        try:
            self._shm.close()
        except BufferError:
            # A numpy view still references the mapping; the unlink below still frees the name.
            log.debug("shared memory views still alive at close", extra={"region": self.region})
        try:
            self._shm.unlink()
        except FileNotFoundError:
            pass
