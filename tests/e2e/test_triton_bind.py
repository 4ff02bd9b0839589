"""The managed Triton binds its HTTP, gRPC and metrics ports to loopback by default (Triton
itself has no authentication: from another machine its shared-memory regions could be listed and
unregistered and its models run), checked by connecting: loopback answers, this machine's
network address does not; --triton-bind-address moves them to a private network address."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from server.triton.launcher import ManagedTriton, TritonPorts
from tests.conftest import free_port, network_address



def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_command_passes_the_bind_address_to_every_port(tmp_path: Path) -> None:
    default = ManagedTriton(tmp_path, tmp_path / "work", TritonPorts(1, 2, 3)).command()
    for flag in ("--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--metrics-address=127.0.0.1"):
        assert flag in default
    private = ManagedTriton(tmp_path, tmp_path / "work", TritonPorts(1, 2, 3, bind_address="10.0.0.7"))
    assert "--grpc-address=10.0.0.7" in private.command() and private.url == "10.0.0.7:1"
    # Every interface: the orchestrator on this machine still reaches it on loopback.
    assert ManagedTriton(tmp_path, tmp_path / "w", TritonPorts(1, 2, 3, bind_address="0.0.0.0")).url == "127.0.0.1:1"


async def test_managed_triton_listens_on_loopback_only(tmp_path: Path) -> None:
    network = network_address()
    if network is None:
        pytest.fail("this machine has no non-loopback IPv4 address to check against")
    (tmp_path / "repository").mkdir()
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port())
    triton = ManagedTriton(tmp_path / "repository", tmp_path / "work", ports, restart_on_exit=False, startup_timeout_s=60)
    await triton.start()
    try:
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=5)
            assert ready.status_code == 200
            metrics = await client.get(f"http://127.0.0.1:{ports.metrics}/metrics", timeout=5)
            assert metrics.status_code == 200
        for port in (ports.grpc, ports.http, ports.metrics):
            assert _accepts("127.0.0.1", port), f"Triton does not answer on 127.0.0.1:{port}"
            assert not _accepts(network, port), f"Triton's port {port} is reachable on {network}"
    finally:
        await triton.stop()


async def test_the_check_sees_a_triton_on_every_interface(tmp_path: Path) -> None:
    """The same connection check against --triton-bind-address 0.0.0.0 (Triton's own default):
    reachable on the network address, so the loopback test above can fail."""
    network = network_address()
    if network is None:
        pytest.fail("this machine has no non-loopback IPv4 address to check against")
    (tmp_path / "repository").mkdir()
    ports = TritonPorts(grpc=free_port(), http=free_port(), metrics=free_port(), bind_address="0.0.0.0")
    triton = ManagedTriton(tmp_path / "repository", tmp_path / "work", ports, restart_on_exit=False, startup_timeout_s=60)
    await triton.start()
    try:
        assert all(_accepts(network, port) for port in (ports.grpc, ports.http, ports.metrics))
    finally:
        await triton.stop()
