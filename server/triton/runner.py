"""Runs inferences and hands their outputs on, through shared memory when it can.

Pipelines never see how tensors travel. With shared memory enabled (Triton on the same host),
inputs are copied into a registered slot and outputs are read in place; a held output can also be
passed to the next model by reference (ShmRef), so a feature map produced by one model and used by
another never leaves shared memory. Without shared memory, or when every slot is busy or a tensor
does not fit, tensors travel inside the gRPC messages and references are turned into arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import grpc
import numpy as np

from server.errors import ServiceError, Unavailable
from server.metrics import Metrics
from server.triton.client import TritonClient
from server.triton.model_spec import ModelSpec
from server.triton.shm import ShmRef, ShmSlot, ShmSlotPool, reclaim_orphaned_regions

log = logging.getLogger(__name__)
T = TypeVar("T")


class Fill(Protocol):
    """An input computed straight into where the request reads it (a shared-memory slot, or a
    new array for gRPC): a large tensor made for one request is written once, not made and then
    copied (a frame resized to S x S is 3 MiB; on these machines every MiB written costs ~0.1 ms)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def offload(self) -> bool:
        """write_into takes long enough (milliseconds) to run in a worker thread, not on the
        event loop every other stream shares."""
        ...

    def write_into(self, out: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Stacked:
    """One-row arrays laid out over the leading dimensions ``leading`` (e.g. 3 objects x 7
    memories: ``leading`` (3, 7), 21 parts of [1, 64, F, F] make [3, 7, 64, F, F]), in C order.
    Written straight into the slot, skipping the rows it already holds (see _write_stacked)."""

    parts: list[np.ndarray]
    leading: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.parts or int(np.prod(self.leading)) != len(self.parts) or any(p.shape[0] != 1 for p in self.parts):
            raise ValueError(f"{len(self.parts)} one-row parts cannot fill leading dimensions {self.leading}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.leading, *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.parts[0].dtype)


# An input: an array, a reference to a tensor already in shared memory, a list of arrays
# stacked along the first axis (written straight into the slot, without an intermediate copy;
# parts already in the slot from its previous request are not written again), a Stacked (the
# same over several leading dimensions), or a Fill.
Tensor = np.ndarray | ShmRef
Input = np.ndarray | ShmRef | list[np.ndarray] | Stacked | Fill

# A slot whose request was abandoned (deadline, cancellation) may still be written by Triton;
# it goes back to the pool only after this long.
_ABANDONED_SLOT_QUARANTINE_S = 60.0


@dataclass(frozen=True)
class RunResult(Generic[T]):
    value: T
    triton_s: float
    consume_s: float
    shared_memory: bool


@dataclass
class Held:
    """The outputs of one inference, kept where they are until the `hold` block ends."""

    outputs: dict[str, Tensor]
    triton_s: float
    shared_memory: bool
    # Bytes the orchestrator itself wrote into the request or read back (references excluded).
    bytes_moved: int = 0
    slot: int | None = None  # the shared-memory slot used (None: gRPC), for prefer_slot
    _read: set[str] = field(default_factory=set)

    def tensor(self, name: str) -> Tensor:
        """To pass to another model: a reference when in shared memory, else the array."""
        return self.outputs[name]

    def array(self, name: str) -> np.ndarray:
        """As numpy (a view into shared memory: valid inside the hold block only)."""
        value = self.outputs[name]
        if name not in self._read:
            self._read.add(name)
            self.bytes_moved += value.nbytes if isinstance(value, ShmRef) else 0
        return value.array() if isinstance(value, ShmRef) else value

    def block(self, name: str, index: tuple[int, ...]) -> Tensor:
        """One sub-tensor at a leading index, dimensions kept (e.g. candidate k of the masks)."""
        value = self.outputs[name]
        if isinstance(value, ShmRef):
            return value.block(index)
        return value[tuple(slice(i, i + 1) for i in index)]


class InferenceRunner:
    def __init__(
        self, client: TritonClient, metrics: Metrics, *, shm_slots_per_model: int = 0, shm_idle_release_s: float = 0.0
    ) -> None:
        """``shm_idle_release_s``: a shared-memory slot free for this long gives its pages back
        (ShmSlotPool.release_idle_pages); 0 keeps them for good."""
        self.client = client
        self.metrics = metrics
        self.shm_slots_per_model = shm_slots_per_model
        self.shm_idle_release_s = shm_idle_release_s
        # Armed while some free slot still holds pages (see _release_idle_pages).
        self._idle_release: asyncio.TimerHandle | None = None
        # Model -> (the spec the pool was made for, the pool; None when the model cannot use one).
        self._pools: dict[str, tuple[ModelSpec, ShmSlotPool | None]] = {}
        # Pools of a model's earlier spec (reloaded model): requests in flight may still hold
        # their slots, so they stay mapped and registered until close().
        self._retired: list[ShmSlotPool] = []
        self._lock = asyncio.Lock()
        self._register_locks: dict[str, asyncio.Lock] = {}
        self._reclaimed = False

    async def run(
        self,
        spec: ModelSpec,
        inputs: Mapping[str, Input],
        outputs: Sequence[str],
        consume: Callable[[dict[str, np.ndarray]], T],
        *,
        timeout_s: float | None = None,
        max_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> RunResult[T]:
        """Infer, then call `consume(outputs)` in a worker thread while the outputs are valid."""
        async with self.hold(spec, inputs, outputs, timeout_s=timeout_s, max_shapes=max_shapes) as held:
            started = time.perf_counter()
            value = await asyncio.to_thread(consume, {name: held.array(name) for name in outputs})
            return RunResult(value, held.triton_s, time.perf_counter() - started, held.shared_memory)

    @contextlib.asynccontextmanager
    async def hold(
        self,
        spec: ModelSpec,
        inputs: Mapping[str, Input],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        max_shapes: Mapping[str, tuple[int, ...]] | None = None,
        prefer_slot: int | None = None,
    ) -> AsyncIterator[Held]:
        """Infer and keep the outputs in place for the block (the slot is released after it).

        `max_shapes` bounds the model's dynamic dimensions (name -> largest shape) so its slots
        can be sized; it is read when the model's pool is made. `prefer_slot`: the slot this
        caller used last time (`Held.slot`), taken again when free, so stacked parts it still
        holds are not written again.
        """
        pool = await self._pool(spec, max_shapes or {})
        shapes = {name: _shape(value) for name, value in inputs.items() if not isinstance(value, ShmRef)}
        fits = pool is not None and pool.fits_shapes(shapes, _dtypes(inputs))
        slot = pool.acquire(prefer_slot) if fits and pool is not None else None
        self.metrics.triton_transfers.labels(spec.name, "grpc" if slot is None else "shm").inc()
        if slot is None:
            plain = {name: _materialise(v) for name, v in inputs.items()}
            started = time.perf_counter()
            result = await self.client.infer(spec.name, plain, outputs, timeout_s=timeout_s)
            moved = sum(a.nbytes for a in plain.values()) + sum(a.nbytes for a in result.values())
            yield Held(dict(result), time.perf_counter() - started, False, moved)
            return

        assert pool is not None
        abandoned = True
        try:
            refs: dict[str, ShmRef] = {}
            written = 0
            for name, value in inputs.items():
                if isinstance(value, ShmRef):
                    refs[name] = value
                    continue
                view = slot.inputs[name].view(shapes[name])
                if isinstance(value, list):
                    written += _write_stacked(view, value, slot.written.setdefault(name, {}))
                elif isinstance(value, Stacked):
                    rows = view.reshape(len(value.parts), *view.shape[len(value.leading):])
                    written += _write_stacked(rows, value.parts, slot.written.setdefault(name, {}))
                else:
                    slot.written.pop(name, None)
                    if isinstance(value, np.ndarray):
                        np.copyto(view, value)
                    elif value.offload:
                        await asyncio.to_thread(value.write_into, view)
                    else:
                        value.write_into(view)
                    written += view.nbytes
                refs[name] = slot.inputs[name].ref(shapes[name])
            # A batching model writes as many output rows as the request has (the slot has room for more).
            rows = next(ref.shape[0] for ref in refs.values()) if spec.max_batch_size > 0 and refs else None
            out_refs = {name: slot.outputs[name].ref(None if rows is None else (rows, *slot.outputs[name].shape[1:]))
                        for name in outputs}
            started = time.perf_counter()
            try:
                await self._infer_in_slot(spec, pool, refs, out_refs, timeout_s)
            except ServiceError as exc:
                # Triton answered (an error status): it is done with the slot. Only a request
                # abandoned while Triton may still be running it keeps the slot in quarantine.
                abandoned = exc.code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
                raise
            abandoned = False
            yield Held(dict(out_refs), time.perf_counter() - started, True, written, slot.index)
        finally:
            if abandoned:
                asyncio.get_running_loop().call_later(_ABANDONED_SLOT_QUARANTINE_S, self._release, pool, slot)
            else:
                self._release(pool, slot)

    def _release(self, pool: ShmSlotPool, slot: ShmSlot) -> None:
        pool.release(slot)
        if self.shm_idle_release_s > 0 and self._idle_release is None:
            self._idle_release = asyncio.get_running_loop().call_later(self.shm_idle_release_s, self._release_idle_pages)

    def _release_idle_pages(self) -> None:
        """Gives back the pages of slots idle for shm_idle_release_s, and comes back when the
        next one will be. On the event loop, between requests, so no slot changes hands while
        its pages go (a few ms for the largest slots)."""
        self._idle_release = None
        now = time.monotonic()
        pools = self._all_pools()
        for pool in pools:
            released = pool.release_idle_pages(self.shm_idle_release_s, now)
            if released:
                self.metrics.triton_shm_released_bytes.labels(pool.model).inc(released)
                log.debug("idle shared-memory slots gave their pages back", extra={"model": pool.model, "bytes": released})
        waits = [w for pool in pools if (w := pool.next_idle_release_s(self.shm_idle_release_s, now)) is not None]
        if waits:
            # Not before 1 s: slots released a moment apart are given back together.
            self._idle_release = asyncio.get_running_loop().call_later(max(min(waits), 1.0), self._release_idle_pages)

    def _all_pools(self) -> list[ShmSlotPool]:
        return [p for _, p in self._pools.values() if p is not None] + self._retired

    async def _infer_in_slot(
        self,
        spec: ModelSpec,
        pool: ShmSlotPool,
        inputs: dict[str, ShmRef],
        outputs: dict[str, ShmRef],
        timeout_s: float | None,
    ) -> None:
        started = time.perf_counter()
        try:
            await self.client.infer_in_shared_memory(spec.name, inputs, outputs, timeout_s=timeout_s)
        except ServiceError as exc:
            # A restarted Triton has forgotten every registration: register again, retry once.
            if "shared memory" not in exc.message:
                raise
            for region_pool in self._pools_of(inputs, outputs, pool):
                await self._reregister(region_pool, exc.message)
            remaining = None if timeout_s is None else timeout_s - (time.perf_counter() - started)
            await self.client.infer_in_shared_memory(spec.name, inputs, outputs, timeout_s=remaining)

    def _pools_of(self, inputs: dict[str, ShmRef], outputs: dict[str, ShmRef], own: ShmSlotPool) -> list[ShmSlotPool]:
        """The pools whose regions this request uses (inputs may reference other models' slots)."""
        regions = {ref.region for ref in (*inputs.values(), *outputs.values())}
        return [own] + [p for p in self._all_pools() if p.region in regions and p is not own]

    async def _reregister(self, pool: ShmSlotPool, reason: str) -> None:
        # Requests failing together after a restart re-register once, not once each.
        async with self._register_locks.setdefault(pool.region, asyncio.Lock()):
            status = await self.client.shared_memory_status(pool.region)
            if status:
                return
            log.info("re-registering shared memory with Triton", extra={"region": pool.region, "reason": reason})
            await self.client.register_shared_memory(pool)

    async def _pool(self, spec: ModelSpec, max_shapes: Mapping[str, tuple[int, ...]]) -> ShmSlotPool | None:
        if self.shm_slots_per_model <= 0:
            return None
        current = self._pools.get(spec.name)
        if current is not None and current[0] is spec:
            return current[1]
        async with self._lock:
            current = self._pools.get(spec.name)
            if current is not None and current[0] is spec:
                return current[1]
            if current is not None and current[1] is not None:  # reloaded: its tensors may have changed
                self._retired.append(current[1])
            if not self._reclaimed:
                # Before this process makes its first region: free those a killed process left.
                self._reclaimed = True
                await asyncio.to_thread(reclaim_orphaned_regions)
            batched = spec.max_batch_size > 0
            if not ShmSlotPool.supports(spec.inputs + spec.outputs, batched=batched, max_shapes=max_shapes):
                self._pools[spec.name] = (spec, None)  # unbounded shapes: always gRPC
                return None
            pool = ShmSlotPool(
                spec.name, spec.inputs, spec.outputs, self.shm_slots_per_model, batched=batched, max_shapes=max_shapes
            )
            try:
                await self.client.register_shared_memory(pool)
            except Exception as exc:
                pool.close()
                if not await self.client.is_server_ready():
                    raise Unavailable(f"Triton at {self.client.url} is not ready") from exc
                # Triton is up but cannot map our region (not on this host, other /dev/shm).
                log.warning(
                    "Triton cannot use shared memory; tensors will travel over gRPC",
                    extra={"model": spec.name, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__},
                )
                self.shm_slots_per_model = 0
                return None
            log.info(
                "shared memory registered with Triton",
                extra={"model": spec.name, "region": pool.region, "slots": self.shm_slots_per_model, "bytes": pool.byte_size},
            )
            self._pools[spec.name] = (spec, pool)
            return pool

    async def _drop(self, pool: ShmSlotPool) -> None:
        try:
            await self.client.unregister_shared_memory(pool.region)
        except Exception as exc:  # noqa: BLE001 - Triton may be gone; the region is ours to free anyway
            log.debug("unregistering shared memory failed", extra={"region": pool.region, "error": str(exc)})
        pool.close()

    async def close(self) -> None:
        if self._idle_release is not None:
            self._idle_release.cancel()
            self._idle_release = None
        for pool in self._all_pools():
            await self._drop(pool)
        self._retired.clear()
        self._pools.clear()


def _shape(value: np.ndarray | list[np.ndarray] | Stacked | Fill) -> tuple[int, ...]:
    if isinstance(value, list):
        return (sum(part.shape[0] for part in value), *value[0].shape[1:])
    return tuple(value.shape)


def _dtypes(inputs: Mapping[str, Input]) -> dict[str, np.dtype]:
    return {
        name: np.dtype(value[0].dtype if isinstance(value, list) else value.dtype)
        for name, value in inputs.items()
        if not isinstance(value, ShmRef)
    }


def _materialise(value: Input) -> np.ndarray:
    if isinstance(value, ShmRef):
        return value.array()
    if isinstance(value, list):
        return np.concatenate(value)
    if isinstance(value, Stacked):
        return np.concatenate(value.parts).reshape(value.shape)
    if isinstance(value, np.ndarray):
        return value
    out = np.empty(value.shape, value.dtype)
    value.write_into(out)
    return out


def _write_stacked(view: np.ndarray, parts: list[np.ndarray], in_slot: dict[int, weakref.ref]) -> int:
    """Writes ``parts`` one after the other along the first axis of ``view``, skipping a
    one-row part that is the very array the slot already holds at its row. Returns the bytes
    written."""
    if any(part.shape[0] != 1 for part in parts):
        in_slot.clear()  # rows of several-row parts are not tracked: write everything
        view[...] = np.concatenate(parts)
        return view.nbytes
    written = 0
    for row, part in enumerate(parts):
        held = in_slot.get(row)
        if held is None or held() is not part:
            view[row] = part[0]
            in_slot[row] = weakref.ref(part)
            written += part.nbytes
    return written
