"""The metrics listener (--metrics-listen): Prometheus ``/metrics`` and the ``/healthz`` probe.

Why an HTTP health endpoint next to grpc.health.v1
    A load balancer that cannot speak gRPC health (HAProxy 2.6, Kubernetes' httpGet probes,
    most L4/L7 appliances) can still ask plain HTTP. ``/healthz`` answers from the same state
    grpc.health.v1 reports (``healthz()`` is passed in; server/app.py gives the monitor's view):
    200 while the replica serves, 503 while it does not (Triton or a model not ready) or drains
    (SIGTERM: it finishes the calls in progress and takes no new ones). The body is a small JSON
    object saying why, for people reading it with curl.

Threads
    Like ``prometheus_client.start_http_server``: a threading WSGI server on a daemon thread,
    so a scrape or a probe never waits on the event loop (and a busy loop never fails a probe
    that only reads published state).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import Collector

__all__ = ["HealthReport", "start_metrics_listener"]

# (serving, details): details is what the JSON body carries besides "serving".
HealthReport = tuple[bool, dict[str, Any]]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Probes come every half second per load balancer: reuse the port at once after a restart.
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        # One line per probe and scrape would drown the server's own log.
        pass


def health_app(healthz: Callable[[], HealthReport], metrics: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """A WSGI app: ``/healthz`` from ``healthz()``, everything else from ``metrics``."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics(environ, start_response)
        serving, details = healthz()
        body = json.dumps({"serving": serving, **details}, sort_keys=True).encode()
        status = "200 OK" if serving else "503 Service Unavailable"
        start_response(
            status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


def start_metrics_listener(listen: str, registry: Collector, healthz: Callable[[], HealthReport]) -> int | None:
    """Serves ``/metrics`` (of ``registry``) and ``/healthz`` on ``listen`` (host:port; port 0
    picks one) until the process exits; returns the port, None when ``listen`` is empty. A
    missing host (":9091") means loopback: the endpoint has no authentication, so every
    interface (0.0.0.0) has to be asked for by name."""
    if not listen:
        return None
    host, _, port_text = listen.rpartition(":")
    server = make_server(
        host.strip("[]") or "127.0.0.1",
        int(port_text),
        health_app(healthz, make_wsgi_app(registry)),
        server_class=_ThreadingServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True).start()
    return int(server.server_port)
