"""The store backends the tests run on, and marks that pick one of them.

``backend`` (tests/conftest.py) is a session fixture parametrized over ``BACKENDS``:
``database_url`` and every fixture built on it (``store``, ``authority``), and every
server a test starts (``est_server``, ``fresh_server``, and the servers that modules
make with ``server_database``) run on each. A test that needs one backend only says
so with a mark, and the reason in its docstring.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import pytest

BACKENDS = ("sqlite", "postgresql")

# For tests of SQLite itself (its DB-API fast path, its PRAGMAs, its file), and of
# what only several nodes on one PostgreSQL can show.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
postgresql_only = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def server_database(request: pytest.FixtureRequest, backend: str) -> str | None:
    """The ``--database-url`` of a server the requesting fixture makes: None on SQLite
    (the server's own file in its data directory), else a fresh migrated database on
    this worker's PostgreSQL cluster, dropped when the requesting fixture ends."""
    if backend == "sqlite":
        return None
    cluster: Any = request.getfixturevalue("pg_cluster")
    database: AbstractContextManager[str] = cluster.database()
    url = database.__enter__()
    request.addfinalizer(lambda: database.__exit__(None, None, None))
    return url
