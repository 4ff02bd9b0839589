"""Per-model concurrency slots for jobs (sized for one T4: 2 detection, 1 matting).

Interactive RPCs (Detect, Track) do not take slots: Triton's own queue serves them. Jobs do,
so a burst of jobs never takes more of the GPU than the slots allow and waits in FIFO order
(asyncio.Semaphore wakes waiters first come, first served).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

__all__ = ["DEFAULT_SLOTS", "Admission"]

DEFAULT_SLOTS: Mapping[str, int] = {"detection": 2, "matting": 1, "tracking": 1}


class Admission:
    def __init__(self, slots: Mapping[str, int] = DEFAULT_SLOTS) -> None:
        for model, count in slots.items():
            if count < 1:
                raise ValueError(f"slot count for {model!r} must be >= 1, got {count}")
        self.capacity = dict(slots)
        self._semaphores = {model: asyncio.Semaphore(count) for model, count in slots.items()}
        self._in_use = dict.fromkeys(slots, 0)

    @contextlib.asynccontextmanager
    async def slot(self, model: str) -> AsyncIterator[None]:
        try:
            semaphore = self._semaphores[model]
        except KeyError:
            raise KeyError(f"no slots configured for model {model!r}") from None
        async with semaphore:
            self._in_use[model] += 1
            try:
                yield
            finally:
                self._in_use[model] -= 1

    def in_use(self, model: str) -> int:
        return self._in_use[model]
