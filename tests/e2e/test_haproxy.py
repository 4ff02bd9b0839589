"""The load balancer's configuration (server/cluster/haproxy.py), checked by the real HAProxy
(`haproxy -c`); tests/e2e/test_cluster.py runs it in front of real replicas."""

from __future__ import annotations

import subprocess

import pytest

from server.cluster.haproxy import Backend, HAProxyConfig, compose_config, find_haproxy

BACKENDS = (Backend("replica-1", "127.0.0.1", 50061, 9101), Backend("replica-2", "127.0.0.1", 50062, 9102))


def haproxy_check(text: str, tmp_path) -> subprocess.CompletedProcess:  # noqa: ANN001
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run([str(find_haproxy()), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


def test_the_configuration_is_valid_haproxy(tmp_path) -> None:  # noqa: ANN001
    checked = haproxy_check(HAProxyConfig(BACKENDS, listen_port=50051, stats_port=8404).render(), tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grpc_to_every_replica_hashed_on_the_session_key_with_health_checks() -> None:
    lines = [line.strip() for line in HAProxyConfig(BACKENDS, listen_port=50051).render().splitlines()]
    assert "bind 127.0.0.1:50051 proto h2" in lines  # gRPC clients: HTTP/2 in clear text
    assert "balance hdr(x-framewise-session)" in lines and "hash-type consistent" in lines
    assert "server replica-1 127.0.0.1:50061 proto h2 check port 9101 check-proto h1" in lines
    assert "server replica-2 127.0.0.1:50062 proto h2 check port 9102 check-proto h1" in lines
    assert "http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost" in lines
    assert "http-check expect status 200" in lines
    # Long streams (watch, track) are not cut by an inactivity timeout shorter than the heartbeat.
    timeouts = {parts[1]: parts[2] for parts in (line.split() for line in lines) if parts[:1] == ["timeout"]}
    assert timeouts["client"] == timeouts["server"] == "3600s"


def test_compose_configuration_resolves_the_replica_services(tmp_path) -> None:  # noqa: ANN001
    text = compose_config(3).render()
    assert "server replica-3 orchestrator-3:50051 proto h2 check port 9091 check-proto h1" in text
    assert "nameserver ns1 127.0.0.11:53" in text and "init-addr last,libc,none" in text
    # Valid even where the names do not resolve (here): HAProxy starts and finds them later.
    checked = haproxy_check(text, tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize(
    "backends, error",
    [((), "at least one backend"), ((BACKENDS[0], BACKENDS[0]), "unique")],
)
def test_bad_backend_lists_are_refused(backends, error) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=error):
        HAProxyConfig(backends).render()
