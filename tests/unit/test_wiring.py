"""server/wiring/: the composition root both processes build from. Its layering (nothing below
it imports it or the process entry points) and its gRPC server's listening socket."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from server.config import ServerConfig, parse_args
from server.interceptors import ObservabilityInterceptor
from server.metrics import Metrics
from server.wiring.grpc_server import build_grpc_server, server_interceptors
from server.wiring.inference import build_inference_stack

SERVER = Path(__file__).resolve().parents[2] / "server"
# The packages the composition root builds from: their dependencies are passed in.
LOW_PACKAGES = ("jobs", "pipelines", "sam2", "triton", "cache", "vision", "media", "did", "servicers")
TOP_MODULES = ("server.app", "server.app_worker", "server.wiring")


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            # `from server import app_worker` names the module in the alias.
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_no_module_below_the_composition_root_imports_it_or_a_process_entry_point() -> None:
    checked, offenders = 0, []
    missing = [package for package in LOW_PACKAGES if not (SERVER / package / "__init__.py").is_file()]
    assert missing == [], "a package named here was moved or renamed: update LOW_PACKAGES"
    for package in LOW_PACKAGES:
        for path in sorted((SERVER / package).rglob("*.py")):
            checked += 1
            for module in _imported_modules(path):
                if any(module == top or module.startswith(top + ".") for top in TOP_MODULES):
                    offenders.append(f"{path.relative_to(SERVER.parent)} imports {module}")
    assert checked > 50, "the layering check found too few modules to mean anything"
    assert offenders == []


def test_the_monitor_lives_in_the_triton_package() -> None:
    assert not (SERVER / "health.py").exists()
    assert "TritonMonitor" in (SERVER / "triton" / "monitor.py").read_text()


def test_the_interceptor_chain_starts_with_observability() -> None:
    observability, chain = server_interceptors(Metrics(CollectorRegistry()))
    assert isinstance(observability, ObservabilityInterceptor)
    assert chain[0] is observability


async def test_the_server_listens_without_tls_when_given_no_credentials_and_refuses_a_taken_port() -> None:
    config = ServerConfig(listen="127.0.0.1:0")
    _, chain = server_interceptors(Metrics(CollectorRegistry()))
    server, port = build_grpc_server(config, interceptors=chain, credentials=None)
    await server.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        # so_reuseport is off: a second server on the same port fails loudly instead of
        # silently sharing the calls.
        with pytest.raises(OSError, match="cannot listen"):
            build_grpc_server(ServerConfig(listen=f"127.0.0.1:{port}"), interceptors=chain, credentials=None)
    finally:
        await server.stop(0)


async def test_the_runner_gets_the_idle_release_time_from_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([]).triton_shm_idle_release_s == 10.0
    config = parse_args(["--triton-shm-idle-release", "2.5"])
    # Built inside a running loop, as the processes build it; nothing connects.
    stack = build_inference_stack(config, Metrics(CollectorRegistry()), triton_url="127.0.0.1:1", shm_slots=4,
                                  service_models={}, health=health_aio.HealthServicer())
    try:
        assert stack.runner.shm_idle_release_s == 2.5 and stack.runner.shm_slots_per_model == 4
    finally:
        await stack.close()
    monkeypatch.setenv("FRAMEWISE_TRITON_SHM_IDLE_RELEASE", "0")
    assert parse_args([]).triton_shm_idle_release_s == 0.0
    with pytest.raises(SystemExit):
        parse_args(["--triton-shm-idle-release", "-1"])
