"""The job store the admin commands (`framewise admin keys|quotas`) work against: their
``--job-store`` option, shared so both name the same store by the same rule (the flag, else
FRAMEWISE_JOB_STORE, else the store `make serve` uses), and ``--json``."""

from __future__ import annotations

import argparse
import os


def add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job-store", default=default_store(),
                        help="the job store the servers use (FRAMEWISE_JOB_STORE; default: the one `make serve` uses)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def default_store() -> str:
    from server.config import JobsConfig  # only when an admin command is built: the CLI's others need no server code

    return os.environ.get("FRAMEWISE_JOB_STORE") or JobsConfig().store
