"""Children the orchestrator starts (tritonserver, the job worker): tied to its life."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def child_setup(death_signal: signal.Signals = signal.SIGTERM, nice: int = 0) -> Callable[[], None]:
    """A ``preexec_fn``: the kernel sends the child ``death_signal`` when the orchestrator dies
    (even by SIGKILL), so no orphan keeps ports, shared memory or jobs; ``nice`` lowers the
    child's CPU priority (a process may lower its own priority, not raise it)."""
    if not 0 <= nice <= 19:
        raise ValueError("nice must be within 0..19")

    def setup() -> None:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, death_signal)
        if nice:
            os.nice(nice)

    return setup
