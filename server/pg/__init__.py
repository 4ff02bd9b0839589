"""A real PostgreSQL server that the project starts itself (tests, ``make serve-cluster``).

    local.py     LocalPostgres: initdb into a folder, start on 127.0.0.1, wait ready, stop
    __main__.py  ``python -m server.pg``: one server until Ctrl-C, its URL on stdout

The orchestrator never starts PostgreSQL in production: it is given a ``postgresql://`` URL.
"""

from server.pg.local import LocalPostgres, PostgresNotFoundError, find_bindir

__all__ = ["LocalPostgres", "PostgresNotFoundError", "find_bindir"]
