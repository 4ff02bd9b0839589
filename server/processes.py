"""Children the orchestrator starts (tritonserver, the job worker): tied to its life.

A ``preexec_fn`` makes Python start the child with fork() (not vfork()), and then gRPC's fork
handlers restart its poller threads in the child, where ``close_fds`` closes their epoll fd
before exec: under gRPC load ~1 child in 4 died of SIGABRT (``epoll_wait error: Bad file
descriptor``) or SIGSEGV before it could exec (grpc/grpc#43055). The processes that start
children therefore turn gRPC's fork support off before gRPC is imported
(:func:`no_grpc_fork_handlers`): no child of ours uses gRPC before exec.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections.abc import Callable

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def no_grpc_fork_handlers() -> None:
    """Call before gRPC is first imported (it reads this when its core starts)."""
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"


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


async def terminate(process: asyncio.subprocess.Process | None, timeout_s: float, what: str) -> None:
    """SIGTERM, up to ``timeout_s`` for the child to exit by itself, then SIGKILL."""
    if process is None or process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), timeout=timeout_s)
    except TimeoutError:
        log.warning(f"{what} did not stop in time; killing it", extra={"pid": process.pid})
        process.kill()
        await process.wait()
