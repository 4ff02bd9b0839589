"""Prometheus metrics of the orchestrator, registered on a registry that is passed in."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# Milliseconds to tens of seconds: detection is ~10-100 ms on CPU, jobs' RPCs return at once.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.rpc_latency = Histogram(
            "framewise_rpc_latency_seconds",
            "Wall time of each RPC handled by the orchestrator.",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.rpc_in_flight = Gauge(
            "framewise_rpc_in_flight", "RPCs being handled right now.", ["method"], registry=registry
        )
        # Authentication outcomes (server/auth/interceptor.py). Bounded labels only: outcome is
        # ok, missing (no credential), refused (one that did not hold), denied (a scope missing)
        # or cross_tenant (another tenant's resource asked for); via is api_key, jwt, mtls or
        # none. Never a key id, tenant or peer: those go to the audit log (logger server.audit).
        self.auth_total = Counter(
            "framewise_auth_total",
            "Authentication and authorization outcomes of the calls that needed credentials.",
            ["outcome", "via"],
            registry=registry,
        )
        # Per-tenant quota refusals (server/quotas/), by quota name (sessions, jobs, storage_bytes,
        # rate.<family>: a fixed set). Never the tenant: that would grow with the tenants.
        self.quota_refusals = Counter(
            "framewise_quota_refusals_total", "Calls refused because a tenant's quota was used up.", ["quota"],
            registry=registry,
        )
        self.rpc_errors = Counter(
            "framewise_rpc_errors_total", "RPCs that ended with a status other than OK.", ["method", "code"],
            registry=registry,
        )
        self.triton_latency = Histogram(
            "framewise_triton_request_latency_seconds",
            "Round trip of each inference request to Triton.",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.triton_transfers = Counter(
            "framewise_triton_transfers_total",
            "Inference requests by how their tensors travelled: shared memory or inside gRPC messages.",
            ["model", "path"],
            registry=registry,
        )
        self.triton_shm_released_bytes = Counter(
            "framewise_triton_shm_released_bytes_total",
            "Bytes of idle shared-memory request slots given back to the system (--triton-shm-idle-release).",
            ["model"],
            registry=registry,
        )
        self.triton_ready = Gauge(
            "framewise_triton_ready", "1 while Triton and every required model are ready.", registry=registry
        )
        self.tracking_sessions = Gauge(
            "framewise_tracking_sessions", "Tracking sessions held (attached to a stream or waiting for resume).", registry=registry
        )
        # No label per session: a session id is the key a resume needs, and one series per
        # session grows without bound. Labels here stay bounded and tenant-free.
        self.tracking_session_bytes = Gauge(
            "framewise_tracking_session_bytes",
            "Memory bank bytes (memories, object pointers) held by all tracking sessions of this process together.",
            registry=registry,
        )
        self.tracking_session_bytes_max = Gauge(
            "framewise_tracking_session_bytes_max",
            "Memory bank bytes of the largest tracking session held right now.",
            registry=registry,
        )
        self.tracking_handoffs = Counter(
            "framewise_tracking_session_handoffs",
            "Tracking sessions handed to the shared store by a draining replica (direction out) and restored from "
            "it by a resume (in), by outcome (ok, failed: the state could not be written or read).",
            ["direction", "outcome"],
            registry=registry,
        )
        self.tracking_frame_bytes = Histogram(
            "framewise_tracking_triton_bytes_per_frame",
            "Bytes moved between the orchestrator and Triton per tracked frame (all objects).",
            buckets=(1e5, 1e6, 4e6, 1.6e7, 6.4e7, 2.56e8),
            registry=registry,
        )
        self.stage_latency = Histogram(
            "framewise_stage_latency_seconds",
            "Time spent per pipeline stage (decode, preprocess, triton, postprocess).",
            ["pipeline", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.storage_bytes = Gauge(
            "framewise_storage_bytes",
            "Bytes held per storage tier (uploads, processed, videos, temp).",
            ["tier"],
            registry=registry,
        )
        self.storage_files = Gauge(
            "framewise_storage_files", "Files held per storage tier.", ["tier"], registry=registry
        )
        self.disk_free_bytes = Gauge(
            "framewise_storage_disk_free_bytes",
            "Free bytes on the file system that holds the storage root.",
            registry=registry,
        )
        self.low_disk = Gauge(
            "framewise_storage_low_disk",
            "1 while free space under the storage root is below the low-disk threshold.",
            registry=registry,
        )
        # The result cache (server/cache/): `kind` is "detection" or "matting", nothing else.
        self.result_cache_hits = Counter(
            "framewise_result_cache_hits_total",
            "Detection / matting results served from the result cache (no Triton request).",
            ["kind"],
            registry=registry,
        )
        self.result_cache_misses = Counter(
            "framewise_result_cache_misses_total",
            "Result cache lookups that found nothing usable (computed by Triton, then stored).",
            ["kind"],
            registry=registry,
        )
        self.result_cache_evictions = Counter(
            "framewise_result_cache_evictions_total",
            "Entries evicted, least recently used first, to keep the cache within --result-cache-bytes.",
            ["kind"],
            registry=registry,
        )
        self.result_cache_errors = Counter(
            "framewise_result_cache_errors_total",
            "Result cache reads or writes that failed (the request went on without the cache).",
            ["kind"],
            registry=registry,
        )
        self.result_cache_bytes = Gauge(
            "framewise_result_cache_bytes",
            "Bytes held in this replica's result cache (values plus a per-entry overhead), as of this process's last write.",
            registry=registry,
        )


class WithChildMetrics:
    """What /metrics serves when a child process has metrics of its own (the job worker): this
    process's registry plus the child's latest exposition, families of the same name merged,
    the child's samples labelled ``process=<label>``."""

    def __init__(self, registry: CollectorRegistry, child_exposition: Callable[[], bytes], label: str) -> None:
        self.registry = registry
        self.child_exposition = child_exposition
        self.label = label

    def collect(self) -> Iterator[Metric]:
        text = self.child_exposition()
        child = {f.name: f for f in text_string_to_metric_families(text.decode())} if text else {}
        for family in self.registry.collect():  # fresh Metric objects on every collect
            theirs = child.pop(family.name, None)
            if theirs is not None:
                family.samples.extend(self._labelled(theirs.samples))
            yield family
        for family in child.values():
            family.samples = self._labelled(family.samples)
            yield family

    def restricted_registry(self, names: Iterable[str]) -> _Restricted:
        """For /metrics?name[]=...: only the families that have one of these sample names."""
        return _Restricted(self, frozenset(names))

    def _labelled(self, samples: list[Sample]) -> list[Sample]:
        return [s._replace(labels={**s.labels, "process": self.label}) for s in samples]


class _Restricted:
    def __init__(self, source: WithChildMetrics, names: frozenset[str]) -> None:
        self.source = source
        self.names = names

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            family.samples = [s for s in family.samples if s.name in self.names]
            if family.samples:
                yield family
