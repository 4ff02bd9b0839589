"""The real orchestrator's transport: TLS with required client certificates on its gRPC port,
what GetServerInfo and `framewise info` say about it, the refusal to listen publicly without
authentication, and the explicit flag that allows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from clients import cli
from clients.channel import Connection
from clients.sdk import FramewiseClient
from tests.conftest import (
    Orchestrator,
    REPO,
    TritonProcess,
    free_port,
    network_address,
    start_orchestrator,
    stop_process,
    wait_until,
)
from tests.tls_certs import Pki
from tests.tls_fixtures import mtls_orchestrator, pki, serving, tls_address  # noqa: F401 - pytest fixtures


def _tls_flags(pki: Pki, *, client_cert: bool = True) -> list[str]:
    flags = ["--ca-cert", str(pki.ca)]
    if client_cert:
        flags += ["--client-cert", str(pki.client.cert), "--client-key", str(pki.client.key)]
    return flags


async def test_server_info_reports_tls_and_client_certificates(mtls_orchestrator: Orchestrator, pki: Pki) -> None:
    address = tls_address(mtls_orchestrator)
    connection = Connection(ca_cert=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key)
    async with FramewiseClient(address, connection=connection) as client:
        security = (await client.server_info()).security
    assert security.tls and security.client_certificates_required
    assert security.authentication_required  # required client certificates authenticate every caller
    assert security.loopback_only and security.listen == mtls_orchestrator.address


async def test_clients_without_a_trusted_certificate_get_no_connection(mtls_orchestrator: Orchestrator, pki: Pki) -> None:
    address = tls_address(mtls_orchestrator)
    for connection in (
        Connection(),  # plaintext
        Connection(ca_cert=pki.ca),  # TLS, no certificate
        Connection(ca_cert=pki.ca, client_cert=pki.stranger.cert, client_key=pki.stranger.key),  # another CA's
    ):
        async with FramewiseClient(address, connection=connection, timeout_s=5) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.server_info()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # And the server still answers a good client.
    good = Connection(ca_cert=pki.ca, client_cert=pki.client.cert, client_key=pki.client.key)
    async with FramewiseClient(address, connection=good) as client:
        assert (await client.server_info()).security.tls


def test_cli_info_over_mutual_tls(mtls_orchestrator: Orchestrator, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    address = tls_address(mtls_orchestrator)
    # Health turns SERVING before every model's spec has been read; info exits 0 once it has.
    wait_until(lambda: cli.main(["--server", address, *_tls_flags(pki), "info"]) == 0, 30, "framewise info to exit 0")
    out = capsys.readouterr().out.rpartition("framewise ")[2]  # the last answer
    assert "authentication required" in out and "TLS on, client certificates required" in out and "loopback only" in out

    code = cli.main(["--server", address, *_tls_flags(pki, client_cert=False), "--timeout", "5", "info"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: UNAVAILABLE: cannot reach") and "--client-cert" in err


def test_cli_info_says_authentication_is_off(
    tmp_path: Path, triton: TritonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    # A server of its own: the shared one requires authentication, as a production server does.
    # No key in its fresh store and no JWT issuer: `auto` leaves authentication off.
    orch = start_orchestrator(tmp_path, ["--triton-url", triton.url], name="open")
    try:
        wait_until(lambda: orch.process.poll() is None and serving(orch.address, Connection()), 60, "the orchestrator")
        # Health turns SERVING before every model's spec has been read; info exits 0 once it has.
        wait_until(lambda: cli.main(["--server", orch.address, "info"]) == 0, 30, "framewise info to exit 0")
        out = capsys.readouterr().out.rpartition("framewise ")[2]  # the last answer
        assert "authentication is OFF" in out and "no TLS" in out and "loopback only" in out

        # And the startup log said so loudly.
        def notices() -> list[dict]:
            return [r for r in orch.log_records() if "AUTHENTICATION IS OFF" in r.get("msg", "")]

        # Health turns SERVING a moment before the last startup lines are written.
        wait_until(lambda: bool(notices()), 10, "the startup notice")
        assert notices()[0]["level"] == "warning" and notices()[0]["loopback_only"] is True
    finally:
        stop_process(orch.process)



def test_public_listen_without_authentication_is_refused(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "server", "--listen", f"0.0.0.0:{port}", "--metrics-listen", "", "--triton-url", "127.0.0.1:1",
         "--job-store", str(tmp_path / "jobs.sqlite3"), "--storage-root", str(tmp_path / "storage"), "--log-format", "text"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert f"refusing to listen on 0.0.0.0:{port} without authentication" in output
    assert "--allow-unauthenticated-public" in output
    # Refused before the gRPC server, Triton or the job engine started.
    assert "framewise serving" not in output and "starting triton" not in output


def test_public_listen_with_the_explicit_flag(tmp_path: Path, triton: TritonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    network = network_address()
    if network is None:
        pytest.fail("this machine has no non-loopback IPv4 address to check against")
    port = free_port()
    orch = start_orchestrator(
        tmp_path, ["--triton-url", triton.url, "--listen", f"0.0.0.0:{port}", "--allow-unauthenticated-public"], name="public"
    )
    try:
        wait_until(lambda: orch.process.poll() is None and serving(f"{network}:{port}", Connection()), 60, "the public orchestrator")
        # Health turns SERVING before every model's spec has been read; info exits 0 once it has.
        wait_until(lambda: cli.main(["--server", f"{network}:{port}", "info"]) == 0, 30, "framewise info to exit 0")
        out = capsys.readouterr().out.rpartition("framewise ")[2]  # the last answer
        assert "authentication is OFF" in out and "reachable from the network" in out
    finally:
        stop_process(orch.process)
