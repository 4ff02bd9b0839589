"""What a tenant may use: the quota names, the defaults (flags ``--quota-*``, env
``FRAMEWISE_QUOTA_*``) and one tenant's limits once the store's overrides are applied.

Quota names are what the store's ``tenant_quotas`` table and ``framewise admin quotas`` use:

* ``sessions``: tracking sessions open at once, over every replica;
* ``jobs``: jobs queued or running at once, over every replica;
* ``storage_bytes``: bytes of uploads and artifacts kept;
* ``rate.<family>`` / ``burst.<family>``: calls per second and the burst a token bucket allows,
  per RPC family (the authorization scopes: vision, tracking, jobs:read, jobs:write, admin).

0 means unlimited, for every quota. Values are floats in the store (a rate is fractional);
counts and bytes are whole numbers.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.auth.principal import SCOPES

__all__ = [
    "COUNT_QUOTAS",
    "FAMILIES",
    "QUOTA_NAMES",
    "QuotaConfig",
    "TenantLimits",
    "add_quota_flags",
    "check_quota_value",
    "quota_config_from_args",
]

FAMILIES: tuple[str, ...] = SCOPES
COUNT_QUOTAS: tuple[str, ...] = ("sessions", "jobs", "storage_bytes")
QUOTA_NAMES: tuple[str, ...] = (*COUNT_QUOTAS, *(f"rate.{f}" for f in FAMILIES), *(f"burst.{f}" for f in FAMILIES))

# Defaults for one tenant. The session and job quotas sit below the server's own bounds (16
# tracking sessions per replica, 64 jobs waiting in the cluster) so that one tenant at its
# quota leaves room for the others: the per-tenant limit bites before the global one. The rates
# only stop floods: a tenant's honest peak on a CPU box is far below them (tune per tenant).
DEFAULT_RATES: Mapping[str, tuple[float, float]] = {
    "vision": (500.0, 1000.0),
    "tracking": (50.0, 100.0),
    "jobs:read": (500.0, 1000.0),
    "jobs:write": (50.0, 100.0),
    "admin": (10.0, 20.0),
}


def _flag(family: str) -> str:
    return family.replace(":", "-")


def check_quota_value(name: str, value: float) -> float:
    """ValueError for an unknown quota name or a value no quota takes (negative, NaN, inf, or
    a fractional count)."""
    if name not in QUOTA_NAMES:
        raise ValueError(f"unknown quota {name!r}; quotas are: {', '.join(QUOTA_NAMES)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"quota {name} must be a finite number >= 0 (0: unlimited), got {value!r}")
    if (name in COUNT_QUOTAS or name.startswith("burst.")) and value != int(value):
        raise ValueError(f"quota {name} is a whole number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's quotas (0: unlimited)."""

    sessions: int
    jobs: int
    storage_bytes: int
    # family -> (calls per second, burst)
    rates: Mapping[str, tuple[float, float]]

    @classmethod
    def from_values(cls, values: Mapping[str, float]) -> TenantLimits:
        return cls(
            sessions=int(values["sessions"]),
            jobs=int(values["jobs"]),
            storage_bytes=int(values["storage_bytes"]),
            rates={f: (values[f"rate.{f}"], values[f"burst.{f}"]) for f in FAMILIES},
        )


@dataclass(frozen=True)
class QuotaConfig:
    """The defaults every tenant gets unless the store holds an override for it."""

    sessions: int = 8
    jobs: int = 16
    storage_bytes: int = 50 * 10**9
    rates: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_RATES))
    # Seconds between re-reads of the store's overrides: `framewise admin quotas set` reaches
    # every replica within this (the hot path never reads the store, see server/quotas/rates.py).
    refresh_s: float = 5.0
    # A tracking session's slot in the store is renewed this often by the replica holding it,
    # and lapses 3 times this after the replica stopped (killed, cut off).
    session_lease_renew_s: float = 10.0
    # A Track stream whose client sends nothing for this long is ended (ABORTED) and its session
    # released unless it tracked something worth resuming: an opened, silent stream cannot hold
    # a session slot forever.
    track_idle_timeout_s: float = 60.0

    def defaults(self) -> dict[str, float]:
        values: dict[str, float] = {
            "sessions": float(self.sessions),
            "jobs": float(self.jobs),
            "storage_bytes": float(self.storage_bytes),
        }
        for family in FAMILIES:
            rate, burst = self.rates[family]
            values[f"rate.{family}"] = float(rate)
            values[f"burst.{family}"] = float(burst)
        return values

    def limits(self, overrides: Mapping[str, float] | None = None) -> TenantLimits:
        """The tenant's limits: these defaults with its overrides from the store applied."""
        values = self.defaults()
        if overrides:
            values.update({k: v for k, v in overrides.items() if k in values})
        return TenantLimits.from_values(values)


def _env(name: str, default: object) -> str:
    value = os.environ.get(f"FRAMEWISE_{name}")
    return value if value is not None else str(default)


def add_quota_flags(p: argparse.ArgumentParser, d: QuotaConfig | None = None) -> None:
    d = d or QuotaConfig()
    g = p.add_argument_group("per-tenant quotas (0: unlimited; `framewise admin quotas set` overrides them per tenant)")
    g.add_argument("--quota-sessions", type=int, default=_env("QUOTA_SESSIONS", d.sessions),
                   help="tracking sessions one tenant may hold at once over every replica (FRAMEWISE_QUOTA_SESSIONS)")
    g.add_argument("--quota-jobs", type=int, default=_env("QUOTA_JOBS", d.jobs),
                   help="jobs one tenant may have queued or running at once over every replica; keep it under "
                        "--max-queued-jobs so one tenant cannot fill the queue (FRAMEWISE_QUOTA_JOBS)")
    g.add_argument("--quota-storage-bytes", type=int, default=_env("QUOTA_STORAGE_BYTES", d.storage_bytes),
                   help="bytes of uploads and artifacts one tenant may keep (FRAMEWISE_QUOTA_STORAGE_BYTES)")
    for family in FAMILIES:
        rate, burst = d.rates[family]
        env = _flag(family).upper().replace("-", "_")
        g.add_argument(f"--quota-rate-{_flag(family)}", type=float, default=_env(f"QUOTA_RATE_{env}", rate),
                       help=f"{family} calls per second per tenant (FRAMEWISE_QUOTA_RATE_{env})")
        g.add_argument(f"--quota-burst-{_flag(family)}", type=int, default=_env(f"QUOTA_BURST_{env}", int(burst)),
                       help=f"{family} calls a tenant may make at once after a quiet spell (FRAMEWISE_QUOTA_BURST_{env})")
    g.add_argument("--quota-refresh", type=float, default=_env("QUOTA_REFRESH", d.refresh_s),
                   help="seconds between re-reads of the per-tenant overrides in the job store (FRAMEWISE_QUOTA_REFRESH)")
    g.add_argument("--quota-session-renew", type=float, default=_env("QUOTA_SESSION_RENEW", d.session_lease_renew_s),
                   help="seconds between renewals of this replica's session slots in the store; a dead replica's "
                        "slots lapse after 3 times this (FRAMEWISE_QUOTA_SESSION_RENEW)")
    g.add_argument("--track-idle-timeout", type=float, default=_env("TRACK_IDLE_TIMEOUT", d.track_idle_timeout_s),
                   help="seconds a Track stream may wait for its client's next message before it is ended and its "
                        "session released, unless it tracked frames (FRAMEWISE_TRACK_IDLE_TIMEOUT)")


def quota_config_from_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> QuotaConfig:
    """The QuotaConfig of parsed flags; ``p.error`` (exit 2) for a value no quota takes."""
    rates = {}
    for family in FAMILIES:
        rates[family] = (
            float(getattr(a, f"quota_rate_{_flag(family).replace('-', '_')}")),
            float(getattr(a, f"quota_burst_{_flag(family).replace('-', '_')}")),
        )
    config = QuotaConfig(
        sessions=a.quota_sessions,
        jobs=a.quota_jobs,
        storage_bytes=a.quota_storage_bytes,
        rates=rates,
        refresh_s=a.quota_refresh,
        session_lease_renew_s=a.quota_session_renew,
        track_idle_timeout_s=a.track_idle_timeout,
    )
    try:
        for name, value in config.defaults().items():
            check_quota_value(name, value)
    except ValueError as exc:
        p.error(f"--quota-*: {exc}")
    for flag, value in (("--quota-refresh", a.quota_refresh), ("--quota-session-renew", a.quota_session_renew),
                        ("--track-idle-timeout", a.track_idle_timeout)):
        if not (math.isfinite(value) and value > 0):
            p.error(f"{flag} must be > 0 seconds, got {value}")
    return config
