"""`python -m server`: run the orchestrator."""

from __future__ import annotations

import os

# The orchestrator's linear algebra is tiny (the 8-state Kalman filter); OpenBLAS's thread pool
# costs more to wake than the solve itself and competes with Triton for the cores. Set before
# numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from server.processes import no_grpc_fork_handlers  # noqa: E402 - no gRPC in it

no_grpc_fork_handlers()  # before gRPC is imported: Triton and the job worker are started with a preexec_fn

import asyncio  # noqa: E402
import ctypes  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from server.app import serve  # noqa: E402
from server.config import parse_args  # noqa: E402
from server.logging_setup import configure_logging  # noqa: E402
from server.triton.launcher import TritonStartError  # noqa: E402
from server.transport import TransportError  # noqa: E402


def _keep_large_buffers() -> None:
    """Stop glibc from handing multi-MB image buffers back to the kernel after every request.

    By default each decoded frame, letterbox canvas and tensor above the mmap threshold is mmap'ed
    and unmapped again, costing ~1,400 page faults and ~3 ms of CPU per detection (measured with
    bench/detect_bench.py). Serving them from the heap and keeping freed memory for reuse removes
    that; the price is a heap that stays at its high-water mark.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024 * 1024)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    _keep_large_buffers()
    configure_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except (TritonStartError, TransportError, OSError) as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
