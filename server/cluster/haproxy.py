"""The cluster's load balancer: an HAProxy configuration for N replicas, and HAProxy run as a
child process.

Why HAProxy (2.6, Debian's) and not nginx (1.22, Debian's)
    Both proxy gRPC over HTTP/2 to the backends. HAProxy also has, in its free version, active
    health checks (nginx's ``health_check`` is nginx Plus only; open-source nginx only notices a
    dead backend when a client request to it fails), and it hashes a request header with
    consistent hashing (``balance hdr(x-framewise-session)`` + ``hash-type consistent``), falling
    back to round robin when the header is absent. A replica that fails its check (killed, or
    draining after SIGTERM, or NOT_SERVING) stops getting new calls within ``fall * inter``, and
    only the sessions whose key hashed to it move elsewhere.

Health checks
    HAProxy 2.6 cannot ask grpc.health.v1, so each replica answers ``GET /healthz`` on its
    metrics listener from the same state (server/metrics_http.py): 200 while SERVING, 503 while
    NOT_SERVING or draining. The check goes to that port (``check port``) over HTTP/1.1
    (``check-proto h1``: the traffic itself is h2).

Timeouts
    WatchOperation and Track are long-lived streams: a watch is quiet between heartbeats (30 s
    by default), a tracking stream between frames. ``timeout client`` / ``timeout server`` bound
    inactivity on a connection, so they are far above both (``stream_timeout_s``); ``timeout
    connect`` stays short so a dead replica is skipped fast (``retries`` + ``option redispatch``
    send the call to another replica when the connection cannot be made; a call already sent
    is never replayed).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

from server.processes import child_setup, terminate

__all__ = [
    "SESSION_HEADER",
    "Backend",
    "HAProxy",
    "HAProxyConfig",
    "HAProxyNotFoundError",
    "compose_config",
    "find_haproxy",
    "write_frontend_pem",
]

log = logging.getLogger(__name__)

# The metadata key a client sets to pin its calls (a tracking session's open and its resumes)
# to one replica. gRPC metadata keys are lowercase, and HTTP/2 header names too.
SESSION_HEADER = "x-framewise-session"


class HAProxyNotFoundError(RuntimeError):
    """No haproxy binary here."""


def find_haproxy(explicit: str | Path | None = None) -> Path:
    """``explicit``, else ``haproxy`` on PATH (Debian: /usr/sbin/haproxy, from ``make lb-deps``)."""
    candidates = [Path(explicit)] if explicit else []
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if not explicit and found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file():
            return path
    raise HAProxyNotFoundError("no haproxy binary: run `make lb-deps` (Debian's haproxy 2.6) or pass its path")


@dataclass(frozen=True)
class Backend:
    """One replica: its name (its --replica-id), gRPC address and /healthz port."""

    name: str
    host: str
    grpc_port: int
    health_port: int


@dataclass(frozen=True)
class HAProxyConfig:
    backends: tuple[Backend, ...]
    listen_host: str = "127.0.0.1"
    listen_port: int = 50051
    # Health checks: every `check_interval_ms`; down after `fall` failures, up after `rise` passes.
    check_interval_ms: int = 500
    check_timeout_ms: int = 1000
    fall: int = 2
    rise: int = 2
    connect_timeout_ms: int = 1000
    # Inactivity allowed on a client or server connection: above the watch heartbeat (30 s) and
    # any pause between a tracking stream's frames.
    stream_timeout_s: int = 3600
    # Where HAProxy's stats page listens (None: none); it shows each replica UP/DOWN.
    stats_port: int | None = None
    session_header: str = SESSION_HEADER
    extra_global: tuple[str, ...] = field(default_factory=tuple)
    # DNS servers ("host:port") to resolve backend names with while running (Docker's embedded
    # DNS, 127.0.0.11:53): a replica container that restarts with a new IP is found again, and
    # one not up yet does not stop HAProxy from starting. Empty: resolved once at start (IPs).
    nameservers: tuple[str, ...] = field(default_factory=tuple)
    # TLS for clients (write_frontend_pem: the certificate chain and its key in one PEM file, as
    # HAProxy loads them). TLS ends here: HAProxy decrypts, then speaks plaintext h2 to the
    # replicas, which listen on loopback or a private network (see the README's cluster TLS
    # notes). None: clients connect in plaintext.
    tls_pem: Path | None = None

    def render(self) -> str:
        """The haproxy.cfg text."""
        if not self.backends:
            raise ValueError("a load balancer needs at least one backend")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be unique: {names}")
        lines = [
            "# Generated by server/cluster/haproxy.py: gRPC (HTTP/2) to N Framewise replicas.",
            "global",
            "    maxconn 4096",
            # Big enough for gRPC's header blocks; messages stream through whatever their size.
            "    tune.bufsize 65536",
            *(f"    {line}" for line in self.extra_global),
            "",
            "defaults",
            "    mode http",
            "    option dontlognull",
            f"    timeout connect {self.connect_timeout_ms}ms",
            f"    timeout client {self.stream_timeout_s}s",
            f"    timeout server {self.stream_timeout_s}s",
            f"    timeout tunnel {self.stream_timeout_s}s",
            f"    timeout check {self.check_timeout_ms}ms",
            "    timeout http-request 30s",
            "    retries 2",
            "    option redispatch 1",
            "",
            "frontend grpc",
            self._bind_line(),
            "    default_backend replicas",
            "",
            "backend replicas",
            # The session key picks the replica; without the header HAProxy falls back to round
            # robin. Consistent hashing: a replica leaving or joining moves only its own keys.
            f"    balance hdr({self.session_header})",
            "    hash-type consistent",
            "    option httpchk",
            "    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost",
            "    http-check expect status 200",
            f"    default-server inter {self.check_interval_ms}ms fastinter {self.check_interval_ms}ms "
            f"downinter {self.check_interval_ms}ms fall {self.fall} rise {self.rise}"
            + (" resolvers dns init-addr last,libc,none" if self.nameservers else ""),
        ]
        for b in self.backends:
            # check-proto h1: without it the check would speak the server's proto (h2) to the
            # HTTP/1 /healthz listener and fail with a socket error.
            lines.append(f"    server {b.name} {b.host}:{b.grpc_port} proto h2 check port {b.health_port} check-proto h1")
        if self.nameservers:
            lines += ["", "resolvers dns", *(f"    nameserver ns{i + 1} {ns}" for i, ns in enumerate(self.nameservers)),
                      "    hold valid 10s"]
        if self.stats_port is not None:
            lines += [
                "",
                "listen stats",
                f"    bind {self.listen_host}:{self.stats_port}",
                "    mode http",
                "    stats enable",
                "    stats uri /",
                "    stats refresh 2s",
            ]
        return "\n".join(lines) + "\n"

    def _bind_line(self) -> str:
        if self.tls_pem is None:
            # gRPC clients speak HTTP/2 in clear text (prior knowledge): proto h2 on the bind.
            return f"    bind {self.listen_host}:{self.listen_port} proto h2"
        # Over TLS, gRPC clients ask for h2 by ALPN; one that does not is not a gRPC client.
        return f"    bind {self.listen_host}:{self.listen_port} ssl crt {self.tls_pem} alpn h2"


def write_frontend_pem(cert: Path, key: Path, destination: Path) -> Path:
    """The certificate chain and its private key in one file, owner-only, as HAProxy's ``crt``
    takes them. Rewritten at every start, so a renewed certificate is picked up by a restart."""
    chain, secret = cert.read_bytes(), key.read_bytes()
    for what, data, marker in (("--tls-cert", chain, b"CERTIFICATE"), ("--tls-key", secret, b"PRIVATE KEY")):
        if b"-----BEGIN " not in data or marker not in data:
            raise ValueError(f"{what}: not a PEM file holding a {marker.decode().lower()}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.touch(mode=0o600, exist_ok=True)
    destination.chmod(0o600)
    destination.write_bytes(chain.rstrip(b"\n") + b"\n" + secret)
    return destination


class HAProxy:
    """HAProxy as a child process: writes ``config`` to ``work_dir/haproxy.cfg``, checks it
    (``haproxy -c``), starts it in the foreground (``-db``) tied to this process's life, stops it."""

    def __init__(
        self, config: HAProxyConfig, work_dir: Path, *, binary: str | Path | None = None, stop_timeout_s: float = 10.0
    ) -> None:
        self.config = config
        self.work_dir = work_dir
        self.binary = find_haproxy(binary)
        self.stop_timeout_s = stop_timeout_s
        self._process: asyncio.subprocess.Process | None = None

    @property
    def config_path(self) -> Path:
        return self.work_dir / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "haproxy.log"

    @property
    def address(self) -> str:
        return f"{self.config.listen_host}:{self.config.listen_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None or self._process.returncode is not None else self._process.pid

    async def start(self, *, ready_timeout_s: float = 10.0) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config.render())
        check = await asyncio.create_subprocess_exec(
            str(self.binary), "-c", "-q", "-f", str(self.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(check.communicate(), ready_timeout_s)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {self.config_path}: {out.decode(errors='replace')[-2000:]}")
        with open(self.log_path, "ab") as log_file:
            self._process = await asyncio.create_subprocess_exec(
                str(self.binary), "-db", "-f", str(self.config_path),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
                # If the launcher dies (even by SIGKILL), HAProxy stops too and frees the port.
                preexec_fn=child_setup(signal.SIGTERM),
            )  # fmt: skip
        await self._wait_listening(ready_timeout_s)
        log.info("haproxy started", extra={"address": self.address, "pid": self._process.pid})

    async def _wait_listening(self, timeout_s: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            assert self._process is not None
            if self._process.returncode is not None:
                raise RuntimeError(f"haproxy exited with {self._process.returncode}: {self._log_tail()}")
            try:
                _, writer = await asyncio.open_connection(self.config.listen_host, self.config.listen_port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    await self.stop()
                    raise RuntimeError(f"haproxy did not listen on {self.address} within {timeout_s} s") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"

    async def stop(self) -> None:
        process, self._process = self._process, None
        await terminate(process, self.stop_timeout_s, "haproxy")


def compose_config(replicas: int) -> HAProxyConfig:
    """The load balancer of docker-compose.yml: services orchestrator-1..N (gRPC on 50051,
    /healthz on 9091) found through Docker's DNS; clients reach it on 50051."""
    return HAProxyConfig(
        tuple(Backend(f"replica-{i}", f"orchestrator-{i}", 50051, 9091) for i in range(1, replicas + 1)),
        listen_host="0.0.0.0",
        listen_port=50051,
        stats_port=8404,
        nameservers=("127.0.0.11:53",),
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m server.cluster.haproxy --compose N``: prints docker/haproxy.cfg."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m server.cluster.haproxy", description=main.__doc__)
    parser.add_argument("--compose", type=int, required=True, metavar="N", help="replicas in docker-compose.yml")
    args = parser.parse_args(argv)
    print(compose_config(args.compose).render(), end="")


if __name__ == "__main__":
    main()
