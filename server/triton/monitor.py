"""Watches Triton and its models, and keeps each model's spec (what the pipelines' contracts,
the runner's shared-memory pools and the result cache's keys derive from); drives
grpc.health.v1 and the server-info answer.

A service is SERVING only while Triton is ready and every model it needs is ready; the server
as a whole ("") only while every watched model is; NOT_SERVING otherwise.
RPCs ask `require_ready()` first, so they fail fast with UNAVAILABLE and a reason instead of
waiting on a dead endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from server.aio import cancel_and_wait
from server.errors import Unavailable
from server.metrics import Metrics
from server.triton.client import TritonClient
from server.triton.model_spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class TritonState:
    live: bool = False
    ready: bool = False
    server_version: str = ""
    last_error: str = "not checked yet"
    model_ready: dict[str, bool] = field(default_factory=dict)


class TritonMonitor:
    def __init__(
        self,
        client: TritonClient,
        service_models: dict[str, tuple[str, ...]],
        health: health_aio.HealthServicer,
        metrics: Metrics,
        *,
        interval_s: float = 1.0,
        conditions: dict[str, Callable[[], str]] | None = None,
        degradable_models: tuple[str, ...] = (),
        reread_models: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        # Models whose spec is read again on every refresh, not only when they (re)appear: a
        # Triton with model control (poll or explicit) reloads a model in place, still ready
        # throughout, with a new version or config. The result cache keys on the spec, so it
        # must see such a reload within one interval. Two RPCs per model and refresh.
        self.reread_models = frozenset(reread_models)
        # Service full name -> a check beyond models (low disk for jobs): "" when fine, else why not.
        self.conditions = dict(conditions or {})
        # Service full name -> the models its implemented RPCs need (empty: needs Triton only).
        self.service_models = service_models
        self.required_models = tuple(dict.fromkeys(m for models in service_models.values() for m in models))
        # Every model watched: the required ones and the degradable ones (no listed service
        # needs those: a job goes on without them). All keep their specs and readiness for
        # callers, and the server as a whole ("") is NOT_SERVING without any of them.
        self.watched_models = tuple(dict.fromkeys((*self.required_models, *degradable_models)))
        self.health = health
        self.metrics = metrics
        self.interval_s = interval_s
        self.state = TritonState()
        self._specs: dict[str, ModelSpec] = {}
        self._task: asyncio.Task[None] | None = None
        self._shutting_down = False
        # What grpc.health.v1 reports now, service full name ("" = the whole server) -> SERVING,
        # for readers that cannot ask gRPC (the metrics listener's /healthz, read on its own
        # thread: the dict is replaced whole, never changed in place).
        self.statuses: dict[str, bool] = {"": False}

    @property
    def serving(self) -> bool:
        return self._ready(self.watched_models)

    def _ready(self, models: tuple[str, ...]) -> bool:
        return self.state.ready and all(self.state.model_ready.get(m, False) for m in models)

    def spec(self, model: str) -> ModelSpec:
        """The model's spec as Triton last reported it; Unavailable when it is not loaded."""
        spec = self._specs.get(model)
        if spec is None or not self.state.model_ready.get(model, False):
            raise Unavailable(f"model {model!r} is not ready on Triton ({self.state.last_error or 'not loaded'})")
        return spec

    def specs(self) -> dict[str, ModelSpec]:
        return dict(self._specs)

    def require_ready(self, model: str) -> ModelSpec:
        if not self.state.ready:
            raise Unavailable(f"Triton at {self.client.url} is not ready: {self.state.last_error}")
        return self.spec(model)

    async def refresh(self) -> None:
        state = TritonState()
        try:
            state.live = await self.client.is_server_live()
            state.ready = await self.client.is_server_ready()
            state.server_version = await self.client.server_version()
            for model in self.watched_models:
                ready = await self.client.is_model_ready(model)
                state.model_ready[model] = ready
                # Re-read the spec whenever a model (re)appears: a restarted Triton may serve a
                # different configuration.
                if ready and (model not in self._specs or not self.state.model_ready.get(model)):
                    self._specs[model] = await self.client.model_spec(model)
                elif ready and model in self.reread_models:
                    await self._reread(model)
            state.last_error = "" if state.ready else "server not ready"
            missing = [m for m in self.watched_models if not state.model_ready.get(m)]
            if state.ready and missing:
                state.last_error = f"models not ready: {', '.join(missing)}"
        except Exception as exc:  # any failure talking to Triton means "not ready"
            state.ready = False
            state.last_error = _short(exc)
        changed = (state.ready, state.model_ready) != (self.state.ready, self.state.model_ready)
        self.state = state
        await self._publish(changed)

    async def _reread(self, model: str) -> None:
        spec = await self.client.model_spec(model)
        old = self._specs[model]
        # A new object only when something changed: callers (the runner's shared-memory pools,
        # the pipelines' contracts, the result cache) recompute what they derive from a spec
        # when its identity changes.
        if spec != old:
            self._specs[model] = spec
            log.info(
                "model changed in Triton",
                extra={"model": model, "version": spec.version, "previous_version": old.version, "source": spec.source},
            )

    async def publish(self) -> None:
        """Tells grpc.health.v1 what is known now without asking Triton: before the first
        refresh, NOT_SERVING for the server and every service."""
        await self._publish(changed=False)

    async def _publish(self, changed: bool) -> None:
        serving = self.serving and not self._shutting_down
        self.metrics.triton_ready.set(1 if serving else 0)
        statuses = {"": serving} | {
            name: self._ready(models) and not self._shutting_down and not self._condition_failure(name)
            for name, models in self.service_models.items()
        }
        self.statuses = statuses
        for name, ok in statuses.items():
            await self.health.set(
                name, health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
        if changed:
            level = logging.INFO if serving else logging.WARNING
            log.log(level, "serving state changed", extra={"serving": serving, "reason": self.state.last_error})

    def _condition_failure(self, service: str) -> str:
        check = self.conditions.get(service)
        return check() if check is not None else ""

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="triton-monitor")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.refresh()

    @property
    def shutting_down(self) -> bool:
        """True once stop() began: the server drains (health NOT_SERVING, new calls refused)."""
        return self._shutting_down

    async def stop(self) -> None:
        """Report NOT_SERVING from now on (graceful shutdown) and stop polling."""
        self._shutting_down = True
        await cancel_and_wait(self._task)
        self._task = None
        await self._publish(changed=False)


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
