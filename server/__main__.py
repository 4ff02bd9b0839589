"""`python -m server`: run the orchestrator."""

from __future__ import annotations

import asyncio
import logging
import sys

from server.app import serve
from server.config import parse_args
from server.logging_setup import configure_logging
from server.triton.launcher import TritonStartError


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except (TritonStartError, OSError) as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
