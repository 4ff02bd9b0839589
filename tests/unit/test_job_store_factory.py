"""open_job_store: the one place --job-store / FRAMEWISE_JOB_STORE becomes a store, for the
serving process (server/wiring/jobs.py); and the flag's validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from framewise.v1 import jobs_service_pb2 as jobs_pb2
from server.config import parse_args
from server.jobs.store import JobStore
from server.jobs.store.factory import is_postgres_url, open_job_store, sqlite_path
from server.jobs.store.postgres import PostgresJobStore
from server.jobs.store.sqlite import SqliteJobStore
from server.pg.local import LocalPostgres
from tests.conftest import drop_postgres_schema, fresh_postgres_schema


def test_which_backend_a_value_names() -> None:
    assert sqlite_path("/var/lib/framewise/jobs.sqlite3") == Path("/var/lib/framewise/jobs.sqlite3")
    assert sqlite_path("relative/jobs.db") == Path("relative/jobs.db")
    assert sqlite_path(Path("/p/q.db")) == Path("/p/q.db")
    assert sqlite_path("sqlite:///relative/jobs.db") == Path("relative/jobs.db")
    assert sqlite_path("sqlite:////abs/jobs%20x.db") == Path("/abs/jobs x.db")
    for url in ("postgresql://u:p@db:5432/framewise", "postgres://db/framewise", "POSTGRESQL://db/x"):
        assert sqlite_path(url) is None and is_postgres_url(url)
    assert not is_postgres_url("/var/lib/jobs.sqlite3")
    for bad in ("mysql://db/x", "sqlite://host/x.db", "sqlite://", "sqlite:///"):
        with pytest.raises(ValueError):
            sqlite_path(bad)


async def test_a_path_or_sqlite_url_opens_sqlite(tmp_path: Path) -> None:
    for value in (str(tmp_path / "a" / "jobs.db"), f"sqlite:///{tmp_path / 'b' / 'jobs.db'}"):
        store = await open_job_store(value, sqlite_synchronous="NORMAL")
        try:
            assert isinstance(store, SqliteJobStore) and isinstance(store, JobStore)
            op, _ = await store.create_operation(kind=jobs_pb2.JOB_KIND_SEGMENT_VIDEO, request=b"r")
            assert (await store.get_operation(op.name)).name == op.name
        finally:
            await store.close()
    assert (tmp_path / "a" / "jobs.db").exists() and (tmp_path / "b" / "jobs.db").exists()


async def test_a_postgresql_url_opens_postgres(postgres_server: LocalPostgres) -> None:
    url, schema = await fresh_postgres_schema(postgres_server)
    try:
        store = await open_job_store(url)
        try:
            assert isinstance(store, PostgresJobStore) and isinstance(store, JobStore)
            op, _ = await store.create_operation(kind=jobs_pb2.JOB_KIND_SEGMENT_VIDEO, request=b"r")
            assert (await store.get_operation(op.name)).name == op.name
        finally:
            await store.close()
    finally:
        await drop_postgres_schema(postgres_server, schema)


def test_the_flag_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://framewise:secret@db:5432/framewise"
    config = parse_args(["--job-store", url]).jobs
    assert config.store == url and config.store_path is None
    monkeypatch.setenv("FRAMEWISE_JOB_STORE", "sqlite:////var/lib/framewise/jobs.sqlite3")
    config = parse_args([]).jobs
    assert config.store_path == Path("/var/lib/framewise/jobs.sqlite3")
    monkeypatch.delenv("FRAMEWISE_JOB_STORE")
    assert parse_args([]).jobs.store_path is not None  # the default: a SQLite file
    with pytest.raises(SystemExit):
        parse_args(["--job-store", "mysql://db/x"])
