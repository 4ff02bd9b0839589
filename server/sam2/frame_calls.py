"""The Triton side of one tracked frame: the model calls it makes (one deadline for all, their
time, the bytes they move, each object's shared-memory slots) and the tensors that go into
shared memory in a form the runner writes directly (the resized frame, the memories in a stable
row order).

The video predictor (video_predictor.py) decides which model gets what; this module only says
how a call is made and what it costs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import cv2
import numpy as np

from server.sam2.contract import Sam2Contract
from server.sam2.session import TrackedObject
from server.triton.runner import Held, InferenceRunner, Input, Tensor
from server.triton.shm import ShmRef

# Frames up to this size are handled on the event loop (decoded, resized into the encoder's
# request, their masks upsampled and RLE-encoded: about 0.2 to 0.4 ms each at 360x240): a
# thread hop would cost about as much. Larger frames go to a thread.
INLINE_FRAME_PIXELS = 640 * 480
# Repeated features up to this size are written on the event loop (a 256-pixel model's rows).
REPEAT_INLINE_BYTES = 1 << 20


class FrameCalls:
    """Model calls of one frame: the deadline they share, their time and the bytes they move."""

    def __init__(self, runner: InferenceRunner, contract: Sam2Contract, started: float, timeout_s: float | None) -> None:
        self.runner = runner
        self.contract = contract
        self.deadline = None if timeout_s is None else started + timeout_s
        self._held: list[Held] = []
        # (start, end) of every Triton call; objects' calls overlap, so their time is the union.
        self._intervals: list[tuple[float, float]] = []

    @property
    def triton_s(self) -> float:
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self._intervals):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    @property
    def bytes_moved(self) -> int:
        """Bytes the orchestrator wrote to or read from Triton's side this frame; tensors passed
        by reference between models do not count, they never left shared memory."""
        return sum(h.bytes_moved for h in self._held)

    @contextlib.asynccontextmanager
    async def hold(
        self, model: str, inputs: dict[str, Input], outputs: list[str], obj: TrackedObject | None = None
    ) -> AsyncIterator[Held]:
        """One call; ``obj``: the object whose memories it carries, sent to the slot it used last."""
        remaining = None if self.deadline is None else self.deadline - time.perf_counter()
        async with self.runner.hold(
            self.contract.specs[model], inputs, outputs, timeout_s=remaining, max_shapes=self.contract.shm_max_shapes(model),
            prefer_slot=None if obj is None else obj.slots.get(model),
        ) as held:
            if obj is not None and held.slot is not None:
                obj.slots[model] = held.slot
            now = time.perf_counter()
            self._intervals.append((now - held.triton_s, now))
            self._held.append(held)
            yield held


@dataclass(frozen=True)
class ResizedFrame:
    """The encoder's ``image`` input [1, S, S, 3] uint8: the RGB frame bilinearly resized to S x S
    (SAM 2 resizes without keeping the aspect ratio), computed straight into the request (a
    runner ``Fill``)."""

    rgb: np.ndarray  # H x W x 3 uint8
    size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.size, self.size, 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    @property
    def offload(self) -> bool:
        # A 360x240 frame resizes in ~0.4 ms: less than a thread hop costs under load. A 1080p
        # or 4K frame takes milliseconds, which the event loop should not spend.
        return self.rgb.shape[0] * self.rgb.shape[1] > INLINE_FRAME_PIXELS

    def write_into(self, out: np.ndarray) -> None:
        resized = cv2.resize(self.rgb, (self.size, self.size), dst=out[0], interpolation=cv2.INTER_LINEAR)
        if not np.shares_memory(resized, out):  # cv2 allocates when dst does not suit it
            out[0] = resized


@dataclass(frozen=True)
class Repeated:
    """``tensor`` ([1, ...]: the frame's features, an encoder output) once per row of a batched
    call ([rows, ...]): every object of the frame attends over and decodes from the same frame.
    A runner ``Fill``: broadcast straight into the request."""

    tensor: Tensor
    rows: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.tensor.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        source = self.tensor
        return np.dtype(source.array().dtype if isinstance(source, ShmRef) else source.dtype)

    @property
    def offload(self) -> bool:
        # S = 1024: 16 MiB of features per row, ~1.5 ms to write; the event loop has other streams.
        return self.rows * self.tensor.nbytes > REPEAT_INLINE_BYTES

    def write_into(self, out: np.ndarray) -> None:
        out[...] = self.tensor.array() if isinstance(self.tensor, ShmRef) else self.tensor


def memory_rows(sent: list[int], memories: list[np.ndarray]) -> list[int]:
    """The order (indices into ``memories``) to send this frame's memories in: a memory sent on the
    previous frame at a row that still exists keeps that row; the others fill the free rows in
    the bank's order.

    Memory attention attends over all memories at once, each marked by its own temporal
    encoding row (memory_tpos), so the order of the memories does not change its result. A
    stable order lets the runner skip writing the memories the request slot already holds: from
    one frame to the next, one memory changes, and 0.5 MiB is written instead of 3.5 MiB."""
    where = {id(m): i for i, m in enumerate(memories)}
    rows: list[int | None] = [where.get(key) for key in sent[: len(memories)]]
    rows += [None] * (len(memories) - len(rows))
    placed = {i for i in rows if i is not None}
    free = iter(i for i in range(len(memories)) if i not in placed)
    return [next(free) if i is None else i for i in rows]


def numpy_dtype(datatype: str) -> type:
    """The numpy type of a Triton tensor datatype the SAM 2 parts use for features."""
    return {"FP16": np.float16, "FP32": np.float32}[datatype]
