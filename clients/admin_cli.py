"""`framewise admin`: administration straight against the job store every replica reads (no
server call, so it works while authentication is required and before any key exists).

    framewise admin keys create --tenant NAME [--scope SCOPE]... [--expires-in 90d] [--json]
    framewise admin keys list [--tenant NAME] [--json]
    framewise admin keys revoke KEY_ID [--json]
    framewise admin quotas set|show ...          (clients/admin_quotas.py)

The store is --job-store, else FRAMEWISE_JOB_STORE, else the one `make serve` uses (a SQLite
path or sqlite:/// URL, or postgresql://...). A new key is printed once and never again: the
store keeps only its SHA-256. Scopes default to every scope but admin. A revocation holds on
every replica within its --auth-key-cache-ttl (2 s by default). Each creation and revocation
writes an audit line (logger server.audit) on stderr.

Exit codes: 0 ok, 1 the store cannot be reached, 2 bad input (an unknown key id included).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import re
import socket
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from clients import admin_quotas
from clients.admin_store import add_store_options

__all__ = ["add_parser", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """"90d", "12h", "30m", "45s", "2w" or plain seconds; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--expires-in {text!r}: give a positive duration such as 90d, 12h, 30m or 3600 (seconds)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Adds the ``admin`` command group to the ``framewise`` parser."""
    from server.auth.principal import SCOPES  # the CLI's other commands need no server code

    admin = commands.add_parser("admin", help="manage API keys and quotas in the job store (no server needed)")
    groups = admin.add_subparsers(dest="admin_command", required=True)

    keys = groups.add_parser("keys", help="API keys: create (shown once), list, revoke")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)

    create = key_commands.add_parser("create", help="make a key for a tenant and print it once")
    create.add_argument("--tenant", required=True, help="the tenant every call with this key belongs to")
    create.add_argument("--scope", action="append", choices=SCOPES, metavar="SCOPE",
                        help=f"a scope the key grants, repeatable: {', '.join(SCOPES)} (default: all but admin)")
    create.add_argument("--expires-in", metavar="DURATION", help="e.g. 90d, 12h, 30m (default: never)")
    add_store_options(create)
    create.set_defaults(run=_create)

    list_ = key_commands.add_parser("list", help="every key (of one tenant): id, tenant, scopes, times; never the key")
    list_.add_argument("--tenant", help="only this tenant's keys")
    add_store_options(list_)
    list_.set_defaults(run=_list)

    revoke = key_commands.add_parser("revoke", help="revoke a key for good, on every replica")
    revoke.add_argument("key_id", help="the id `keys list` shows (the 12 hex characters after fwk_)")
    add_store_options(revoke)
    revoke.set_defaults(run=_revoke)

    admin_quotas.add_parser(groups)


def _audit_to_stderr() -> None:
    """The audit lines (server.audit) of this process go to stderr as JSON; stdout stays the
    command's output."""
    from server.logging_setup import JsonFormatter

    audit = logging.getLogger("server.audit")
    if not audit.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        audit.addHandler(handler)
        audit.setLevel(logging.INFO)
        audit.propagate = False


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = str(os.getuid())
    return f"admin-cli:{user}@{socket.gethostname()}"


async def _open(args: argparse.Namespace) -> Any:
    from server.jobs.store.factory import open_job_store
    from server.jobs.store.protocol import JobStoreUnavailableError

    try:
        return await open_job_store(args.job_store)
    except JobStoreUnavailableError as exc:
        raise _StoreUnreachable(str(exc)) from exc


class _StoreUnreachable(Exception):
    pass


def _record_json(record: Any) -> dict[str, Any]:
    def iso(t: datetime | None) -> str | None:
        return None if t is None else t.isoformat()

    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "scopes": list(record.scopes),
        "created": iso(record.create_time),
        "expires": iso(record.expire_time),
        "revoked": iso(record.revoke_time),
        "last_used": iso(record.last_used_time),
    }


async def _create(args: argparse.Namespace) -> int:
    from server.auth import audit
    from server.auth.keys import generate_key
    from server.auth.mtls import DEFAULT_SCOPES
    from server.auth.principal import check_tenant

    check_tenant(args.tenant)  # ValueError: exit 2 before the store is opened
    expires = datetime.now(UTC) + parse_duration(args.expires_in) if args.expires_in else None
    scopes = tuple(dict.fromkeys(args.scope)) if args.scope else DEFAULT_SCOPES

    async def run(store: Any) -> int:
        new = generate_key()
        record = await store.create_api_key(
            key_id=new.key_id, tenant=args.tenant, scopes=scopes, secret_hash=new.secret_hash, expire_time=expires
        )
        _audit_to_stderr()
        audit.key_created(record, actor=_actor())
        expiry = None if record.expire_time is None else record.expire_time.isoformat()
        if args.json:
            print(json.dumps({"key": new.key, "key_id": record.key_id, "tenant": record.tenant,
                              "scopes": list(record.scopes), "expires": expiry}))
            return 0
        print(new.key)
        print(f"key id {record.key_id}, tenant {record.tenant}, scopes {' '.join(record.scopes) or '(none)'}, "
              f"expires {expiry or 'never'}", file=sys.stderr)
        print("this is the only time the key is shown: store it now (the server keeps only its hash)", file=sys.stderr)
        return 0

    return await _with_store(args, run)


async def _list(args: argparse.Namespace) -> int:
    async def run(store: Any) -> int:
        records = await store.list_api_keys(tenant=args.tenant)
        if args.json:
            print(json.dumps({"keys": [_record_json(r) for r in records]}))
            return 0
        if not records:
            print("no API keys" + (f" for tenant {args.tenant}" if args.tenant else ""))
            return 0
        now = datetime.now(UTC)
        print(f"{'key id':<14} {'tenant':<20} {'state':<8} {'scopes':<40} {'created (UTC)':<20} {'expires (UTC)':<20} last used (UTC)")
        for r in records:
            state = "revoked" if r.revoke_time else ("expired" if r.expire_time and r.expire_time <= now else "active")
            print(f"{r.key_id:<14} {r.tenant:<20} {state:<8} {' '.join(r.scopes):<40} {_short(r.create_time):<20} "
                  f"{_short(r.expire_time) or 'never':<20} {_short(r.last_used_time) or 'never'}")
        return 0

    return await _with_store(args, run)


async def _revoke(args: argparse.Namespace) -> int:
    from server.auth import audit

    async def run(store: Any) -> int:
        before = await store.get_api_key(args.key_id)
        record = await store.revoke_api_key(args.key_id)
        if record is None:
            print(f"error: no API key has the id {args.key_id[:40]!r} (see `framewise admin keys list`)", file=sys.stderr)
            return 2
        if before is not None and before.revoke_time is None:
            _audit_to_stderr()
            audit.key_revoked(record, actor=_actor())
        if args.json:
            print(json.dumps(_record_json(record)))
        else:
            print(f"revoked {record.key_id} (tenant {record.tenant}) at {record.revoke_time.isoformat()}; every replica "
                  "refuses it within its --auth-key-cache-ttl (2 s by default)")
        return 0

    return await _with_store(args, run)


async def _with_store(args: argparse.Namespace, fn: Any) -> int:
    try:
        store = await _open(args)
    except _StoreUnreachable as exc:
        print(f"error: UNAVAILABLE: cannot reach the job store {args.job_store}: {exc}", file=sys.stderr)
        return 1
    try:
        return await fn(store)
    finally:
        await store.close()


def _short(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")
