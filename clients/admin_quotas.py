"""`framewise admin quotas`: per-tenant quota overrides, written to the job store every replica
reads (each picks a change up within its --quota-refresh, 5 s by default).

    framewise admin quotas set --tenant NAME [--sessions N] [--jobs N] [--storage-bytes N]
                               [--rate FAMILY=PER_SECOND]... [--burst FAMILY=N]... [--clear QUOTA|all]...
    framewise admin quotas show [--tenant NAME] [--json]

FAMILY is one of vision, tracking, jobs:read, jobs:write, admin; 0 means unlimited. ``show``
with a tenant prints its effective limits (the defaults this command sees: built-in values and
FRAMEWISE_QUOTA_* variables, as the server reads them, unless a --quota-* flag differs there),
which come from an override, and what the tenant uses now; without one, every override stored.
The store is --job-store, else FRAMEWISE_JOB_STORE, else the one `make serve` uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from clients.admin_store import add_store_options

if TYPE_CHECKING:
    from server.quotas.limits import QuotaConfig

__all__ = ["add_parser"]


def add_parser(admin_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds ``quotas set|show`` under the ``framewise admin`` command group."""
    # Imported here: the CLI's other commands load no server code.
    from server.quotas.limits import FAMILIES, QUOTA_NAMES

    quotas = admin_commands.add_parser("quotas", help="per-tenant quota overrides in the job store")
    commands = quotas.add_subparsers(dest="quotas_command", required=True)

    set_ = commands.add_parser("set", help="set or clear a tenant's overrides (0: unlimited)")
    set_.add_argument("--tenant", required=True)
    set_.add_argument("--sessions", type=int, help="tracking sessions at once, over every replica")
    set_.add_argument("--jobs", type=int, help="jobs queued or running at once")
    set_.add_argument("--storage-bytes", type=int, help="bytes of uploads and artifacts kept")
    set_.add_argument("--rate", action="append", default=[], metavar="FAMILY=PER_SECOND",
                      help=f"calls per second of one family ({', '.join(FAMILIES)}); repeatable")
    set_.add_argument("--burst", action="append", default=[], metavar="FAMILY=N",
                      help="calls at once after a quiet spell, of one family; repeatable")
    set_.add_argument("--clear", action="append", default=[], metavar="QUOTA",
                      help=f"back to the default: one of {', '.join(QUOTA_NAMES)}, or all; repeatable")
    add_store_options(set_)
    set_.set_defaults(run=_set)

    show = commands.add_parser("show", help="a tenant's effective quotas and usage, or every override")
    show.add_argument("--tenant", help="the tenant (omitted: list every tenant's overrides)")
    add_store_options(show)
    show.set_defaults(run=_show)


def _family_values(items: list[str], kind: str) -> dict[str, float]:
    from server.quotas.limits import FAMILIES

    out = {}
    for item in items:
        family, sep, value = item.rpartition("=")
        if not sep or family not in FAMILIES:
            raise ValueError(f"--{kind} takes FAMILY=VALUE with FAMILY one of {', '.join(FAMILIES)}, got {item!r}")
        try:
            out[f"{kind}.{family}"] = float(value)
        except ValueError:
            raise ValueError(f"--{kind} {item!r}: {value!r} is not a number") from None
    return out


def _changes(args: argparse.Namespace) -> dict[str, float | None]:
    from server.auth.principal import check_tenant
    from server.quotas.limits import QUOTA_NAMES, check_quota_value

    check_tenant(args.tenant)
    changes: dict[str, float | None] = {}
    for name in args.clear:
        if name == "all":
            changes.update(dict.fromkeys(QUOTA_NAMES))
        elif name in QUOTA_NAMES:
            changes[name] = None
        else:
            raise ValueError(f"--clear {name!r}: not a quota; quotas are {', '.join(QUOTA_NAMES)} (or all)")
    for name, value in (("sessions", args.sessions), ("jobs", args.jobs), ("storage_bytes", args.storage_bytes)):
        if value is not None:
            changes[name] = float(value)
    changes.update(_family_values(args.rate, "rate"))
    changes.update(_family_values(args.burst, "burst"))
    if not changes:
        raise ValueError("nothing to set: give --sessions, --jobs, --storage-bytes, --rate, --burst or --clear")
    for name, value in changes.items():
        if value is not None:
            check_quota_value(name, value)
    return changes


async def _with_store(args: argparse.Namespace, fn: Callable[[Any], Awaitable[int]]) -> int:
    """Runs ``fn(store)``; exit 1 with UNAVAILABLE when the store cannot be reached."""
    from server.jobs.store.factory import open_job_store
    from server.jobs.store.protocol import JobStoreUnavailableError

    try:
        store = await open_job_store(args.job_store)
    except JobStoreUnavailableError as exc:
        print(f"error: UNAVAILABLE: cannot reach the job store {args.job_store}: {exc}", file=sys.stderr)
        return 1
    try:
        return await fn(store)
    finally:
        await store.close()


async def _set(args: argparse.Namespace) -> int:
    changes = _changes(args)  # ValueError (exit 2) before the store is opened

    async def run(store: Any) -> int:
        _print_set(args, await store.set_tenant_quotas(args.tenant, changes))
        return 0

    return await _with_store(args, run)


def _print_set(args: argparse.Namespace, overrides: dict[str, float]) -> None:
    if args.json:
        print(json.dumps({"tenant": args.tenant, "overrides": overrides}))
    else:
        print(f"tenant {args.tenant}: " + (", ".join(f"{k}={v:g}" for k, v in overrides.items()) or "no overrides (defaults)"))
        print("every replica applies this within its --quota-refresh (default 5 s)")


def _defaults() -> QuotaConfig:
    """The defaults as a server started with this environment and no --quota-* flags has them."""
    from server.quotas.limits import add_quota_flags, quota_config_from_args

    p = argparse.ArgumentParser()
    add_quota_flags(p)
    return quota_config_from_args(p, p.parse_args([]))


async def _show(args: argparse.Namespace) -> int:
    return await _with_store(args, lambda store: _show_from(args, store))


async def _show_from(args: argparse.Namespace, store: Any) -> int:
    from server.quotas.enforcer import SESSIONS
    from server.quotas.limits import QUOTA_NAMES

    if args.tenant is None:
        every = await store.all_tenant_quotas()
        if args.json:
            print(json.dumps({"overrides": every}))
        elif not every:
            print("no tenant has overrides: every tenant has the defaults (--quota-* flags)")
        else:
            for tenant, overrides in every.items():
                print(f"{tenant}: " + ", ".join(f"{k}={v:g}" for k, v in overrides.items()))
        return 0
    overrides = await store.tenant_quotas(args.tenant)
    usage = {
        "sessions": await store.count_quota_leases(SESSIONS, args.tenant),
        "jobs": await store.count_tenant_jobs(args.tenant),
        "artifact_bytes": (await store.tenant_usage(args.tenant))[2],
    }
    effective = _defaults().defaults()
    effective.update(overrides)
    report: dict[str, Any] = {
        "tenant": args.tenant,
        "quotas": {name: {"limit": effective[name], "source": "override" if name in overrides else "default"} for name in QUOTA_NAMES},
        "usage": usage,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"tenant {args.tenant} (0: unlimited; usage now: sessions {usage['sessions']}, jobs {usage['jobs']}, "
          f"artifact bytes {usage['artifact_bytes']})")
    for name, q in report["quotas"].items():
        print(f"  {name:<18} {q['limit']:>16,.15g}  {q['source']}")
    return 0
