"""`framewise admin keys create|list|revoke` (clients/admin_cli.py): the installed `framewise`
command in a child process, against a real SQLite file and a real PostgreSQL server, checked
by reading the store and by verifying the printed key the way the server does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from clients.admin_cli import parse_duration
from server.auth.key_verifier import ApiKeyVerifier
from server.config import JobsConfig
from server.jobs.store.factory import open_job_store
from tests.conftest import drop_postgres_schema, fresh_postgres_schema

FRAMEWISE = str(Path(sys.executable).parent / "framewise")


def admin(*args: str, store: str | None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--job-store", store] if store is not None else []
    return subprocess.run([FRAMEWISE, "admin", "keys", *args, *extra], capture_output=True, text=True, timeout=60,
                          env=env or dict(os.environ), check=False)


@pytest.fixture(params=["sqlite", "postgres"])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path, postgres_server) -> str:
    if request.param == "sqlite":
        yield str(tmp_path / "jobs.sqlite3")
        return
    url, schema = await fresh_postgres_schema(postgres_server)
    yield url
    await drop_postgres_schema(postgres_server, schema)


async def test_create_prints_a_working_key_once_and_stores_only_its_hash(store_url: str) -> None:
    result = admin("create", "--tenant", "acme", "--scope", "vision", "--scope", "jobs:read", "--expires-in", "30d", "--json",
                   store=store_url)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"key", "key_id", "tenant", "scopes", "expires"}
    assert (created["tenant"], created["scopes"]) == ("acme", ["vision", "jobs:read"])
    expires = datetime.fromisoformat(created["expires"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=5)
    # The audit line went to stderr, naming the key id and never the key.
    audit_line = json.loads(result.stderr.strip().splitlines()[-1])
    assert (audit_line["logger"], audit_line["event"], audit_line["key_id"]) == ("server.audit", "key_created", created["key_id"])
    assert created["key"] not in result.stderr
    store = await open_job_store(store_url)
    try:
        record = await store.get_api_key(created["key_id"])
        assert record is not None and created["key"] not in repr(record)
        check = await ApiKeyVerifier(store).verify(created["key"])
        assert check.principal is not None and check.principal.tenant == "acme"
        assert check.principal.scopes == {"vision", "jobs:read"}
    finally:
        await store.close()
    # `list` never shows a key again.
    listed = admin("list", "--json", store=store_url)
    assert listed.returncode == 0 and created["key"] not in listed.stdout
    assert [k["key_id"] for k in json.loads(listed.stdout)["keys"]] == [created["key_id"]]


async def test_list_filters_by_tenant_and_revoke_holds(store_url: str) -> None:
    a = json.loads(admin("create", "--tenant", "tenant-a", "--json", store=store_url).stdout)
    b = json.loads(admin("create", "--tenant", "tenant-b", "--json", store=store_url).stdout)
    # Default scopes: everything but admin; never expires.
    assert a["scopes"] == ["vision", "tracking", "jobs:read", "jobs:write"] and a["expires"] is None
    only_b = json.loads(admin("list", "--tenant", "tenant-b", "--json", store=store_url).stdout)["keys"]
    assert [k["key_id"] for k in only_b] == [b["key_id"]]
    table = admin("list", store=store_url)
    assert table.returncode == 0 and a["key_id"] in table.stdout and b["key_id"] in table.stdout and "active" in table.stdout

    revoked = admin("revoke", a["key_id"], "--json", store=store_url)
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"] is not None
    assert json.loads(revoked.stderr.strip().splitlines()[-1])["event"] == "key_revoked"
    store = await open_job_store(store_url)
    try:
        assert (await ApiKeyVerifier(store, cache_ttl_s=0).verify(a["key"])).reason == "revoked"
        assert (await ApiKeyVerifier(store, cache_ttl_s=0).verify(b["key"])).reason == "ok"
    finally:
        await store.close()
    assert "revoked" in admin("list", store=store_url).stdout


@pytest.mark.parametrize(
    "args",
    [
        ("create", "--tenant", "../etc"),
        ("create", "--tenant", "acme", "--scope", "root"),
        ("create", "--tenant", "acme", "--expires-in", "soon"),
        ("create", "--tenant", "acme", "--expires-in", "0d"),
        ("revoke", "0123456789ab"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = admin(*args, store=str(tmp_path / "jobs.sqlite3"))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "error" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_store_exits_1(tmp_path: Path) -> None:
    result = admin("list", store="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr and "Traceback" not in result.stderr


def test_without_a_store_flag_it_uses_the_environment_then_the_serve_default(tmp_path: Path) -> None:
    env = dict(os.environ, FRAMEWISE_JOB_STORE=str(tmp_path / "from-env.sqlite3"))
    result = admin("create", "--tenant", "acme", "--json", store=None, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from-env.sqlite3").exists()


def test_the_default_store_is_the_one_make_serve_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    from clients.admin_store import default_store  # what `admin keys` and `admin quotas` both use

    monkeypatch.delenv("FRAMEWISE_JOB_STORE", raising=False)
    assert default_store() == JobsConfig().store
    monkeypatch.setenv("FRAMEWISE_JOB_STORE", "postgresql://db/jobs")
    assert default_store() == "postgresql://db/jobs"


def test_parse_duration() -> None:
    assert parse_duration("90d") == timedelta(days=90)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_duration("3600") == timedelta(hours=1)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("", "-1d", "1y", "d", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
