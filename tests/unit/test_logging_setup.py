"""server.logging_setup: the level the server is started with, and the libraries kept quiet."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from server.logging_setup import QUIET_LIBRARIES, configure_logging


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {name: logging.getLogger(name).level for name in QUIET_LIBRARIES})
    stream = io.StringIO()
    yield stream
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def test_debug_keeps_the_servers_records_and_drops_grpc_internals(captured: io.StringIO) -> None:
    configure_logging("DEBUG", "json", captured)
    logging.getLogger("server.pipelines").debug("rpc ok", extra={"method": "/x"})
    logging.getLogger("grpc._cython.cygrpc").debug("[_cygrpc] Loaded running loop")
    logging.getLogger("httpcore.connection").debug("close.started")
    logging.getLogger("grpc._cython.cygrpc").info("kept: grpc's own info and above")
    records = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert [r["msg"] for r in records] == ["rpc ok", "kept: grpc's own info and above"]
    assert records[0]["method"] == "/x"


def test_a_stricter_level_applies_to_the_quiet_libraries_too(captured: io.StringIO) -> None:
    configure_logging("WARNING", "json", captured)
    logging.getLogger("grpc").info("dropped")
    logging.getLogger("grpc").warning("kept")
    assert [json.loads(line)["msg"] for line in captured.getvalue().splitlines()] == ["kept"]
