"""Run the D-ID emulator: ``python -m did_emulator --port 8081 [--api-key KEY] [--state-dir DIR]``."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from did_emulator.server import start_emulator

STATE_DIR_ENV = "DID_EMULATOR_STATE_DIR"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m did_emulator", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8081, help="port to listen on (0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=None,
        help="the only key accepted in 'Authorization: Basic <key>' (default: any non-empty key)",
    )
    parser.add_argument(
        "--stage-delay-s",
        type=float,
        default=0.2,
        help="seconds a talk spends in 'created' and again in 'started' (default 0.2)",
    )
    parser.add_argument(
        "--storage-dir",
        type=Path,
        default=None,
        help="where uploads and results are kept (default: a temporary folder, removed on exit)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=os.environ.get(STATE_DIR_ENV) or None,
        help="keep uploads, talks and results here across restarts, as D-ID does (also the storage folder; "
        f"default ${STATE_DIR_ENV}, else nothing outlives the process)",
    )
    args = parser.parse_args(argv)
    if args.state_dir is not None and args.storage_dir is not None and args.state_dir != args.storage_dir:
        parser.error("--state-dir is the storage folder too: give one of --state-dir and --storage-dir")
    handle = start_emulator(
        args.host,
        args.port,
        args.api_key,
        stage_delay_s=args.stage_delay_s,
        storage_dir=args.storage_dir,
        state_dir=None if args.state_dir is None else Path(args.state_dir),
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    kept = " (kept across restarts)" if args.state_dir is not None else ""
    print(f"D-ID emulator listening on {handle.url} (storage {handle.storage}{kept})", flush=True)
    try:
        # With a timeout, not a bare wait(): the kernel may deliver SIGTERM to any thread (the
        # server's, a render's), and Python runs the handler only when the main thread next runs
        # bytecode; a main thread blocked in an untimed lock wait never does, and the process never
        # stops (seen: one left running for hours after a test's SIGTERM).
        while not stop.wait(timeout=0.5):
            pass
    finally:
        handle.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
