"""The jobs benchmark's native watcher: K WatchOperation streams in one small C process (bench/native/).

Why: a grpc.aio client spends ~60-100 us of CPU per message it receives. With 100 watchers in one Python process
on the benchmark's 2 shared cores, the watchers' own work (~10 ms per event fanned out to 100) competes with the
service they are timing, and the last of the 100 receipts waits behind the other 99 in one GIL. Real watchers are
separate clients on other machines. grpc_watch_fanout (libnghttp2, one epoll loop, ~10-17 us per message) keeps the
bytes and arrival time of every message and does nothing else; the benchmark decodes them after the round.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "bench" / "native" / "grpc_watch_fanout.c"
BINARY = REPO / ".cache" / "bin" / "grpc_watch_fanout"
NGHTTP2_HEADER = Path("/usr/include/nghttp2/nghttp2.h")


def build(binary: Path = BINARY) -> Path:
    """Compiles the watcher when it is missing or older than its source; says what to install if it cannot."""
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not NGHTTP2_HEADER.exists():
        raise RuntimeError("the native watcher needs a C compiler and libnghttp2's headers: "
                           "apt-get install gcc libnghttp2-dev (`make bench` does this)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(SOURCE), "-lnghttp2"], check=True)
    return binary


@dataclass(frozen=True, slots=True)
class Usage:
    """The watcher's CPU seconds (user, system) and its thread's scheduler times (on a CPU, waiting for one)."""

    user_s: float
    system_s: float
    run_s: float
    wait_s: float

    @classmethod
    def parse(cls, fields: list[bytes]) -> Usage:
        return cls(*(float(f) for f in fields))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.user_s - other.user_s, self.system_s - other.system_s, self.run_s - other.run_s,
                     self.wait_s - other.wait_s)

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s


@dataclass(slots=True)
class StreamResult:
    id: int
    status: int  # grpc-status; -1 when the stream ended without one
    details: str
    messages: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival time.time(), message bytes)


class NativeWatch:
    """One grpc_watch_fanout process: start it with every stream's request, ``await attached()`` (every stream has
    its first message), ``await ended()`` once the streams are due to end, then ``await results()``."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def start(cls, address: str, method: str, requests: list[bytes], timeout_s: float,
                    binary: Path = BINARY) -> NativeWatch:
        host, port = address.rsplit(":", 1)
        process = await asyncio.create_subprocess_exec(
            str(binary), host, port, method, str(timeout_s),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=1 << 24)
        assert process.stdin is not None
        process.stdin.write(b"".join(f"{i} {r.hex()}\n".encode() for i, r in enumerate(requests)))
        await process.stdin.drain()
        process.stdin.close()
        return cls(process)

    @property
    def pid(self) -> int:
        return self._process.pid

    async def attached(self) -> Usage:
        """Once every stream has its first message: the watcher's usage then."""
        line = await self._line()
        if not line.startswith(b"attached "):
            raise RuntimeError("native watcher: the streams did not all get a first message before its deadline "
                               f"({line[:200]!r})")
        return Usage.parse(line.split()[1:])

    async def ended(self) -> Usage:
        """Once every stream has ended: the watcher's usage then (before it prints what it received)."""
        line = await self._line()
        if not line.startswith(b"ended "):
            raise RuntimeError(f"native watcher: expected 'ended', got {line[:200]!r}")
        return Usage.parse(line.split()[1:])

    async def results(self) -> list[StreamResult]:
        """Every stream's status and messages, after ``ended``."""
        streams: dict[int, StreamResult] = {}
        while True:
            line = await self._line()
            kind, _, rest = line.partition(b" ")
            if kind == b"M":
                sid, t, hexed = rest.split(b" ", 2)
                streams[int(sid)].messages.append((float(t), bytes.fromhex(hexed.strip().decode())))
            elif kind == b"S":
                sid, status, _count, details = (rest.rstrip(b"\n").split(b" ", 3) + [b""])[:4]
                # grpc-message is percent-encoded on the wire
                streams[int(sid)] = StreamResult(int(sid), int(status), urllib.parse.unquote(details.decode()))
            elif line == b"end\n":
                break
            else:
                raise RuntimeError(f"native watcher: unexpected output {line[:200]!r}")
        await self._process.wait()
        return [streams[i] for i in sorted(streams)]

    async def kill(self) -> None:
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    async def _line(self) -> bytes:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            code = await self._process.wait()
            raise RuntimeError(f"native watcher exited (code {code}) before it said everything")
        return line
