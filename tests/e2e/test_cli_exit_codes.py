"""`framewise` on a refused call: it exits non-zero and prints the status code's name first
("error: UNAUTHENTICATED: ..."), with the exit code saying what kind of refusal it was:
1 failed / unreachable / not found, 2 bad input, 3 the caller was refused (UNAUTHENTICATED,
PERMISSION_DENIED)."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from clients import cli
from framewise.v1 import info_service_pb2, info_service_pb2_grpc
from tests.conftest import ASSETS, Orchestrator, TritonProcess, free_port, serving_orchestrator, stop_process, wait_until


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_not_found_exits_1_naming_the_code(orchestrator: Orchestrator, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--server", orchestrator.address, "watch", "operations/does-not-exist")
    assert code == 1 and err.startswith("error: NOT_FOUND: ")


def test_bad_input_exits_2_naming_the_code_and_field(orchestrator: Orchestrator, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_bytes(b"these are not pixels")
    code, err = _run(capsys, "--server", orchestrator.address, "detect", str(not_an_image))
    assert code == 2 and err.startswith("error: INVALID_ARGUMENT: ") and "field image" in err


def test_unreachable_exits_1_naming_the_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--server", f"127.0.0.1:{free_port()}", "--timeout", "3", "info")
    assert code == 1 and err.startswith("error: UNAVAILABLE: cannot reach")


def test_tls_client_against_a_plaintext_server_exits_1(orchestrator: Orchestrator, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--server", orchestrator.address, "--tls", "--timeout", "3", "info")
    assert code == 1 and err.startswith("error: UNAVAILABLE: ")


def test_bad_client_settings_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--client-cert", str(tmp_path / "c.pem"), "info")
    assert code == 2 and "--client-cert and --client-key go together" in err


# --- refusals of the caller, by the real server with --auth required ----------------------------


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory, triton: TritonProcess) -> Iterator[tuple[Orchestrator, str]]:
    """The orchestrator requiring credentials, and a key of tenant "acme" with the vision scope only."""
    tmp = tmp_path_factory.mktemp("auth")
    store = str(tmp / "auth-jobs.sqlite3")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["admin", "keys", "create", "--tenant", "acme", "--scope", "vision", "--json", "--job-store", store]) == 0
    key = json.loads(out.getvalue())["key"]
    orch = serving_orchestrator(tmp, ["--triton-url", triton.url, "--auth", "required", "--job-store", store], name="auth")
    yield orch, key
    stop_process(orch.process)


def test_real_server_unauthenticated_exits_3(
    auth_server: tuple[Orchestrator, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    orch, _ = auth_server
    monkeypatch.delenv("FRAMEWISE_API_KEY", raising=False)
    code, err = _run(capsys, "--server", orch.address, "info")  # health is open; GetServerInfo is not
    assert code == 3, err
    assert err.startswith("error: UNAUTHENTICATED: ") and "--api-key or set FRAMEWISE_API_KEY" in err
    code, err = _run(capsys, "--server", orch.address, "--api-key", "fwk_000000000000_not-a-key", "operations")
    assert code == 3 and err.startswith("error: UNAUTHENTICATED: ")


def test_real_server_permission_denied_exits_3(auth_server: tuple[Orchestrator, str], capsys: pytest.CaptureFixture[str]) -> None:
    orch, key = auth_server
    code, err = _run(capsys, "--server", orch.address, "--api-key", key, "operations")  # needs jobs:read
    assert code == 3 and err.startswith("error: PERMISSION_DENIED: ") and "jobs:read" in err


def test_real_server_accepts_the_key_from_the_environment(
    auth_server: tuple[Orchestrator, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    orch, key = auth_server
    monkeypatch.setenv("FRAMEWISE_API_KEY", key)
    code = cli.main(["--server", orch.address, "detect", str(ASSETS / "images" / "bus.jpg"), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert len(json.loads(out.out)["detections"]) == 4
    # And `info` says authentication is required (the key has no admin scope; any credential may ask).
    wait_until(lambda: cli.main(["--server", orch.address, "info"]) == 0, 30, "framewise info to exit 0")
    assert "authentication required (--auth required)" in capsys.readouterr().out


# --- the same refusals from a minimal endpoint ----------------------------------------------------
# A gRPC endpoint on a real socket that refuses like the authentication layer does (missing key:
# UNAUTHENTICATED; a key without the scope: PERMISSION_DENIED; the right key: the answer): the
# CLI's handling, independent of the server's authentication settings.


class _Guarded(info_service_pb2_grpc.InfoServiceServicer):
    def GetServerInfo(self, request: info_service_pb2.GetServerInfoRequest, context: grpc.ServicerContext) -> info_service_pb2.GetServerInfoResponse:
        keys = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if not keys:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send authorization: Bearer <api key or JWT>")
        if keys != ["Bearer good-key"]:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the key lacks the scope 'admin'")
        return info_service_pb2.GetServerInfoResponse(server_version="guarded", serving=True)


@pytest.fixture(scope="module")
def guarded() -> Iterator[str]:
    """Health open (as the real server keeps it), InfoService guarded."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    info_service_pb2_grpc.add_InfoServiceServicer_to_server(_Guarded(), server)
    health = HealthServicer()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_unauthenticated_exits_3_naming_the_code(guarded: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRAMEWISE_API_KEY", raising=False)
    code, err = _run(capsys, "--server", guarded, "info")
    assert code == 3, err
    assert err.startswith("error: UNAUTHENTICATED: missing credentials")
    assert "--api-key or set FRAMEWISE_API_KEY" in err


def test_permission_denied_exits_3(guarded: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "--server", guarded, "--api-key", "other-key", "info")
    assert code == 3 and err.startswith("error: PERMISSION_DENIED: the key lacks the scope 'admin'")


def test_the_key_from_the_environment_is_sent(guarded: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMEWISE_API_KEY", "good-key")
    code = cli.main(["--server", guarded, "info"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "framewise guarded" in out.out
