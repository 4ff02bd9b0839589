"""`open_job_store(url)`: the one place a process turns ``--job-store`` into an open JobStore.

postgresql://user:password@host:5432/db   PostgresJobStore (also postgres://)
sqlite:///relative/jobs.sqlite3           SqliteJobStore on that file (SQLAlchemy's form:
sqlite:////absolute/jobs.sqlite3          three slashes then the path, so four for /...)
/plain/path/jobs.sqlite3 or jobs.sqlite3  SqliteJobStore (what --job-store always meant)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.errors import shown
from server.jobs.store.protocol import JobStore

__all__ = ["is_postgres_url", "open_job_store", "sqlite_path"]

_POSTGRES_SCHEMES = ("postgresql", "postgres")


def _scheme(url: str) -> str:
    head, sep, _ = url.partition("://")
    return head.lower() if sep else ""


def is_postgres_url(url: str) -> bool:
    return _scheme(url) in _POSTGRES_SCHEMES


def sqlite_path(url: str | Path) -> Path | None:
    """The SQLite file a ``--job-store`` value names, or None for a PostgreSQL URL. ValueError
    for any other scheme (a typo must not silently create a file named ``mysql:/...``)."""
    text = str(url)
    scheme = _scheme(text)
    if not scheme:
        return Path(text)
    if scheme in _POSTGRES_SCHEMES:
        return None
    if scheme == "sqlite":
        parts = urlsplit(text)
        if parts.netloc or not parts.path.startswith("/") or len(parts.path) < 2:
            raise ValueError(f"job store {shown(text)}: write sqlite:///relative/path or sqlite:////absolute/path")
        return Path(unquote(parts.path[1:]))
    raise ValueError(
        f"job store {shown(text)}: unknown scheme {scheme!r}; use a file path, sqlite:///path or postgresql://..."
    )


async def open_job_store(url: str | Path, *, sqlite_synchronous: str = "FULL") -> JobStore:
    """Opens (connects, creates or migrates) the store ``url`` names; the caller closes it.
    ``sqlite_synchronous`` is SQLite's commit durability (``--job-store-sync``); PostgreSQL's
    is the server's own (``synchronous_commit``)."""
    path = sqlite_path(url)
    if path is None:
        # Imported here: a SQLite deployment needs no PostgreSQL driver loaded.
        from server.jobs.store.postgres import PostgresJobStore

        return await PostgresJobStore(str(url)).open()
    from server.jobs.store.sqlite import SqliteJobStore

    return await SqliteJobStore(path, synchronous=sqlite_synchronous).open()
