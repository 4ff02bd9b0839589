"""Runs one inference and hands its outputs to a consumer, through shared memory when it can.

Pipelines call `run()` and never see how tensors travel: with shared memory enabled (Triton on
the same host), inputs are copied into a registered slot and outputs are consumed in place;
otherwise, or when every slot is busy, tensors travel inside the gRPC messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from server.errors import ServiceError, Unavailable
from server.metrics import Metrics
from server.triton.client import TritonClient
from server.triton.model_spec import ModelSpec
from server.triton.shm import ShmSlot, ShmSlotPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# A slot whose request was abandoned (deadline, cancellation) may still be written by Triton;
# it goes back to the pool only after this long.
_ABANDONED_SLOT_QUARANTINE_S = 60.0


@dataclass(frozen=True)
class RunResult(Generic[T]):
    value: T
    triton_s: float
    consume_s: float
    shared_memory: bool


class InferenceRunner:
    def __init__(self, client: TritonClient, metrics: Metrics, *, shm_slots_per_model: int = 0) -> None:
        self.client = client
        self.metrics = metrics
        self.shm_slots_per_model = shm_slots_per_model
        # Model -> (the spec the pool was made for, the pool; None when the model cannot use one).
        self._pools: dict[str, tuple[ModelSpec, ShmSlotPool | None]] = {}
        self._lock = asyncio.Lock()

    async def run(
        self,
        spec: ModelSpec,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        consume: Callable[[dict[str, np.ndarray]], T],
        *,
        timeout_s: float | None = None,
        max_shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> RunResult[T]:
        """Infer, then call `consume(outputs)` in a worker thread while the outputs are valid.

        `max_shapes` bounds the dynamic dimensions of the model's tensors (name -> largest shape),
        so that its shared-memory slots can be sized; it is read when the model's pool is made.
        """
        pool = await self._pool(spec, max_shapes or {})
        slot = pool.acquire() if pool is not None and pool.fits(inputs) else None
        self.metrics.triton_transfers.labels(spec.name, "grpc" if slot is None else "shm").inc()
        if slot is None:
            started = time.perf_counter()
            arrays = await self.client.infer(spec.name, inputs, outputs, timeout_s=timeout_s)
            triton_s = time.perf_counter() - started
            started = time.perf_counter()
            value = await asyncio.to_thread(consume, arrays)
            return RunResult(value, triton_s, time.perf_counter() - started, False)

        assert pool is not None
        finished = False
        try:
            for name, array in inputs.items():
                np.copyto(slot.inputs[name].view(array.shape), array)
            shapes = {name: array.shape for name, array in inputs.items()}
            started = time.perf_counter()
            await self._infer_in_slot(spec, pool, slot, shapes, timeout_s)
            triton_s = time.perf_counter() - started
            started = time.perf_counter()
            value = await asyncio.to_thread(consume, {name: slot.outputs[name].view() for name in outputs})
            finished = True
            return RunResult(value, triton_s, time.perf_counter() - started, True)
        finally:
            if finished:
                pool.release(slot)
            else:
                asyncio.get_running_loop().call_later(_ABANDONED_SLOT_QUARANTINE_S, pool.release, slot)

    async def _infer_in_slot(
        self, spec: ModelSpec, pool: ShmSlotPool, slot: ShmSlot, shapes: dict[str, tuple[int, ...]], timeout_s: float | None
    ) -> None:
        try:
            await self.client.infer_in_shared_memory(spec.name, slot, shapes, timeout_s=timeout_s)
        except ServiceError as exc:
            # A restarted Triton has forgotten every registration: register again, retry once.
            if "shared memory" not in exc.message:
                raise
            log.info("re-registering shared memory with Triton", extra={"region": pool.region, "reason": exc.message})
            await self.client.register_shared_memory(pool)
            await self.client.infer_in_shared_memory(spec.name, slot, shapes, timeout_s=timeout_s)

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
                await self._drop(current[1])
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
        for _, pool in list(self._pools.values()):
            if pool is not None:
                await self._drop(pool)
        self._pools.clear()
