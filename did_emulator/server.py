"""Running the emulator: the threading HTTP server, and a handle to start and stop it."""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Self

from did_emulator.app import Handler
from did_emulator.state import EmulatorState


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api_key: str | None, state: EmulatorState) -> None:
        super().__init__(address, Handler)
        self.api_key = api_key
        self.state = state
        self.stopping = threading.Event()


@dataclass
class EmulatorHandle:
    """A running emulator: ``url`` to point a client at, ``stop()`` to shut it down."""

    server: EmulatorServer
    thread: threading.Thread
    storage: Path
    owns_storage: bool
    url: str = field(init=False)

    def __post_init__(self) -> None:
        host, port = self.server.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{port}"

    @property
    def state(self) -> EmulatorState:
        return self.server.state

    def stop(self, render_timeout_s: float = 30.0) -> None:
        """Stop serving, then let the talks being rendered finish (up to ``render_timeout_s``): a
        render cut short by the process exiting leaves a truncated mp4 behind."""
        self.server.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.server.state.wait_for_renders(render_timeout_s)
        if self.owns_storage:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_emulator(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    *,
    stage_delay_s: float = 0.2,
    storage_dir: Path | None = None,
    state_dir: Path | None = None,
) -> EmulatorHandle:
    """Serve the emulator from a background thread. ``port=0`` picks a free port; ``api_key=None``
    accepts any non-empty Basic credentials; uploads and results go under ``storage_dir`` (a
    temporary folder, removed on stop, when not given). ``state_dir``: the uploads and talks are
    kept there (with a state.json) and a later emulator on the same folder serves them again, as
    D-ID keeps them across its own restarts; it is the storage folder too, and never removed."""
    if state_dir is not None and storage_dir is not None and Path(state_dir) != Path(storage_dir):
        raise ValueError("state_dir is the storage folder too: give one of state_dir and storage_dir")
    chosen = state_dir if state_dir is not None else storage_dir
    owns = chosen is None
    storage = Path(tempfile.mkdtemp(prefix="did-emulator-")) if chosen is None else Path(chosen)
    storage.mkdir(parents=True, exist_ok=True)
    state = EmulatorState(storage, stage_delay_s, persist=state_dir is not None)
    server = EmulatorServer((host, port), api_key, state)
    thread = threading.Thread(target=server.serve_forever, name="did-emulator", daemon=True)
    thread.start()
    return EmulatorHandle(server=server, thread=thread, storage=storage, owns_storage=owns)
