"""The metrics listener (server/metrics_http.py): /metrics for Prometheus and /healthz for load
balancers that cannot ask grpc.health.v1, over a real socket."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter

from server.metrics_http import HealthReport, start_metrics_listener


def test_healthz_follows_the_reported_state_and_metrics_stay_served() -> None:
    registry = CollectorRegistry()
    Counter("framewise_probe_total", "A counter to find in /metrics.", registry=registry).inc(3)
    state: dict[str, object] = {"serving": True, "draining": False}

    def healthz() -> HealthReport:
        return bool(state["serving"]), {"draining": state["draining"], "replica_id": "replica-7"}

    port = start_metrics_listener("127.0.0.1:0", registry, healthz)
    assert port
    base = f"http://127.0.0.1:{port}"
    ok = httpx.get(f"{base}/healthz", timeout=5)
    assert ok.status_code == 200 and ok.json() == {"serving": True, "draining": False, "replica_id": "replica-7"}
    state.update(serving=False, draining=True)  # SIGTERM: the replica drains
    down = httpx.get(f"{base}/healthz", timeout=5)
    assert down.status_code == 503 and down.json()["draining"] is True
    assert down.headers["cache-control"] == "no-store"
    metrics = httpx.get(f"{base}/metrics", timeout=5)
    assert metrics.status_code == 200 and "framewise_probe_total 3.0" in metrics.text


def test_no_listen_address_means_no_listener() -> None:
    assert start_metrics_listener("", CollectorRegistry(), lambda: (True, {})) is None
