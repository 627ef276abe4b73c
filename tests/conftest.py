"""Shared fixtures: real estkit servers, each in its own temporary data directory."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from backends import BACKENDS, server_database
from estkit.store import SqlStore
from estserver import DEFAULT_PORTS, EstServer, hold_port, make_server
from pgcluster import PgCluster, running_cluster

_HELD = pytest.StashKey[list[socket.socket]]()


def pytest_configure(config: pytest.Config) -> None:
    """8443 and 8444 are taken for the whole run, as when `make run` serves beside it.

    Held by the one process that lives for the whole run: the xdist controller (its
    workers skip this), or pytest itself without xdist. Any test that binds or
    connects to a default port then fails here too, not only on a developer's
    machine. When the ports are already taken (`make run` serves) nothing is held.
    """
    if hasattr(config, "workerinput"):
        return
    config.stash[_HELD] = [s for port in DEFAULT_PORTS if (s := hold_port(port)) is not None]


def pytest_unconfigure(config: pytest.Config) -> None:
    for sock in config.stash.get(_HELD, []):
        sock.close()


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The store backend of the test: each test that uses a store or a server runs on
    each (``backends.sqlite_only`` / ``postgresql_only`` pick one)."""
    return str(request.param)


@pytest.fixture(scope="session")
def est_server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    """One running server shared by the tests of a worker (default config), per backend."""
    database = server_database(request, backend)
    server = make_server(tmp_path_factory.mktemp("est"), database_url=database)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_server(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path
) -> Iterator[EstServer]:
    """A server of the test's own, not yet started, whose config the test may change."""
    server = make_server(tmp_path, database_url=server_database(request, backend))
    try:
        yield server
    finally:
        server.stop()


_counter = iter(range(1_000_000))


@pytest.fixture
def device_id(request: pytest.FixtureRequest) -> str:
    """A device id unique within the session, readable in logs."""
    name = re.sub(r"[^A-Za-z0-9-]", "-", request.node.name)[:40].strip("-")
    return f"{name}-{os.getpid()}-{next(_counter)}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL cluster of this worker, started when a test first needs it."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def database_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[str]:
    """A migrated database of the test's own: SQLite in ``tmp_path``, or a database on
    this worker's PostgreSQL cluster."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'estkit.db'}"
        migrated = SqlStore.open(url)
        migrated.migrate()
        migrated.close()
        yield url
    else:
        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        with cluster.database() as url:
            yield url


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """A migrated store on each backend, no server."""
    s = SqlStore.open(database_url)
    yield s
    s.close()
