"""``python -m server.pg [--root DIR] [--port N]``: one PostgreSQL server until Ctrl-C or SIGTERM.

Prints its ``postgresql://`` URL on the first line of stdout once it accepts connections (what
``make serve-cluster`` passes to every replica as ``--job-store``). With ``--root`` the cluster
is kept there between runs; without it, a temporary one is removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from server.pg.local import LocalPostgres


async def _serve(root: Path | None, port: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with LocalPostgres(root, port=port) as server:
        print(server.url, flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m server.pg", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=None, help="folder of the cluster (kept); default: a temporary one"
    )
    parser.add_argument("--port", type=int, default=None, help="TCP port on 127.0.0.1; default: a free one")
    args = parser.parse_args()
    asyncio.run(_serve(args.root, args.port))


if __name__ == "__main__":
    main()
