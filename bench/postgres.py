"""PostgreSQL for the benchmark: a throwaway cluster as durable as estkit's SQLite store,
estkit nodes on it, the CPU of its processes, and a million rows written with COPY.

The cluster is the tests' (``tests/pgcluster.py``: ``initdb`` + ``pg_ctl`` on a
free loopback port, as the ``postgres`` user when run as root), with durability
turned back on: estkit's SQLite store commits with ``synchronous=FULL`` (one
fsync per commit, WAL), so PostgreSQL runs with its defaults ``fsync=on``,
``synchronous_commit=on`` and ``full_page_writes=on`` rather than the tests'
``off``. Everything else is PostgreSQL's default (``shared_buffers`` 128 MB).

The postmaster and its backends are one process tree under the postmaster's pid
(the first line of ``postmaster.pid``); the benchmark adds that tree's CPU to
the server's, so a request costs what estkit and its database spent on it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol, cast

import psycopg
import sqlalchemy as sa
from psycopg import sql

from bench import fleet

# What SQLite's synchronous=FULL promises: a commit survives a power loss.
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
INSTALL_HINT = "scripts/install-test-debs.sh postgresql"


class Cluster(Protocol):
    """What the benchmark needs of ``tests/pgcluster.PgCluster``."""

    data: Path  # the cluster's data directory
    port: int

    def url(self, database: str) -> str: ...

    def database(self) -> AbstractContextManager[str]: ...


class _PgClusterModule(Protocol):
    def bin_dir(self) -> Path | None: ...

    def running_cluster(
        self, *, settings: Mapping[str, str] | None = None
    ) -> AbstractContextManager[Cluster]: ...


def _pgcluster() -> _PgClusterModule:
    return cast(_PgClusterModule, fleet.tests_module("pgcluster"))


def installed() -> bool:
    """PostgreSQL's server binaries are there (Debian's ``postgresql`` package)."""
    return _pgcluster().bin_dir() is not None


@contextmanager
def durable_cluster() -> Iterator[Cluster]:
    """A running throwaway cluster with fsync on; removed on exit."""
    with _pgcluster().running_cluster(settings=DURABLE) as cluster:
        yield cluster


def postmaster_pid(cluster: Cluster) -> int:
    """The root of the cluster's process tree (its backends are the postmaster's children)."""
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


def libpq_url(database_url: str) -> str:
    """An estkit/SQLAlchemy URL (``postgresql+psycopg://``) as libpq takes it."""
    return database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def server_version(database_url: str) -> str:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def count_certificates(database_url: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM certificates").fetchone()
    return int(row[0]) if row else 0


# -- nodes ----------------------------------------------------------------------------


def init_node(data_dir: Path, *, source: Path, database_url: str, port: int, crl_port: int) -> None:
    """A node on ``database_url`` with the CAs, TLS files and labels of ``source`` (the
    SQLite server's data directory), so the same device pool enrolls on both."""
    shutil.copytree(source, data_dir, ignore=shutil.ignore_patterns("estkit.db*"))
    fleet.estkit(
        "server", "init", "--data-dir", data_dir, "--database-url", libpq_url(database_url),
        "--port", str(port), "--crl-port", str(crl_port),
    )  # fmt: skip


def join_node(data_dir: Path, *, joined: Path, region: str, port: int, crl_port: int) -> None:
    """Another node on ``joined``'s database, as an operator adds one (``server init --join``)."""
    fleet.estkit(
        "server", "init", "--data-dir", data_dir, "--join", joined, "--region", region,
        "--public-url", f"https://localhost:{port}", "--port", str(port),
        "--crl-port", str(crl_port),
    )  # fmt: skip


def repoint_node(
    data_dir: Path, *, source: Path, database_url: str, port: int, crl_port: int
) -> None:
    """A copy of node ``source``'s data directory on another database and its own ports."""
    shutil.copytree(source, data_dir)
    fleet.estkit(
        "server", "init", "--data-dir", data_dir, "--database-url", libpq_url(database_url),
        "--port", str(port), "--crl-port", str(crl_port),
    )  # fmt: skip


# -- data -----------------------------------------------------------------------------


def copy_store(source_url: str, target_url: str) -> int:
    """Every row of an estkit store (any backend) into a migrated PostgreSQL database at
    the same revision, replacing what it held; the node registry stays behind. Returns
    the rows copied. Neither database may be in use."""
    from estkit.store import schema

    tables = [t for t in schema.metadata.sorted_tables if t.name != "nodes"]
    source = sa.create_engine(source_url)
    copied = 0
    try:
        with (
            source.connect() as read,
            psycopg.connect(libpq_url(target_url)) as conn,
            conn.transaction(),
            conn.cursor() as cur,
        ):
            for table in reversed(tables):
                cur.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table.name)))
            for table in tables:
                columns = [c.name for c in table.columns]
                with cur.copy(_copy_statement(table.name, columns)) as out:
                    for row in read.execute(table.select()):
                        out.write_row(tuple(row))
                        copied += 1
                if "id" in table.columns:  # the next id after the copied ones
                    cur.execute(
                        sql.SQL(
                            "SELECT setval(pg_get_serial_sequence({t}, 'id'), "
                            "(SELECT coalesce(max(id), 0) + 1 FROM {i}), false)"
                        ).format(t=sql.Literal(table.name), i=sql.Identifier(table.name))
                    )
    finally:
        source.dispose()
    return copied


def clone_database(cluster: Cluster, *, source_url: str, name: str) -> str:
    """A copy named ``name`` of the database at ``source_url`` (nothing may be connected
    to it), without its node registry: the copy's nodes are others. Its URL."""
    source = sa.engine.make_url(source_url).database
    if source is None:
        raise ValueError(f"{source_url}: no database name")
    with psycopg.connect(libpq_url(cluster.url("postgres")), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(source)
            )
        )
    url = cluster.url(name)
    with psycopg.connect(libpq_url(url)) as conn:
        conn.execute("DELETE FROM nodes")
    return url


def analyze(database_url: str) -> None:
    """Fresh planner statistics and visibility map (``VACUUM (ANALYZE)``), written out
    (``CHECKPOINT``) so that no write-back or autovacuum competes with what follows."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        conn.execute("CHECKPOINT")


def fill(
    database_url: str,
    rows: int,
    *,
    now: dt.datetime,
    progress: Callable[[int], None] = lambda _: None,
) -> fleet.FillReport:
    """Add ``fleet.fleet_rows(rows)`` (the rows the SQLite scale run writes) with COPY, in
    one transaction, the secondary indexes of ``certificates`` dropped during the copy and
    built after; then ``analyze``. ``progress`` gets the rows written every 10 %.
    No server may be using the database."""
    bulk = fleet.fleet_rows(rows, now=now)
    start = time.monotonic()
    step = max(1, rows // 10)
    written = 0
    with psycopg.connect(libpq_url(database_url)) as conn:
        conn.execute("SET TIME ZONE 'UTC'")  # the rows' times are naive UTC text
        with conn.transaction(), conn.cursor() as cur:
            indexes = cur.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'certificates' "
                "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
            ).fetchall()
            for name, _ in indexes:
                cur.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
            with cur.copy(_copy_statement("devices", fleet.DEVICE_COLUMNS)) as out:
                for device in bulk.devices:
                    out.write_row(device)
            with cur.copy(_copy_statement("certificates", fleet.CERTIFICATE_COLUMNS)) as out:
                for batch in bulk.certificates:
                    for row in batch:
                        out.write_row(row)
                    before, written = written, written + len(batch)
                    if written // step > before // step:
                        progress(written)
            for _, definition in indexes:
                cur.execute(definition)  # pg_indexes' own CREATE INDEX statement
        size_row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    analyze(database_url)
    return fleet.FillReport(
        rows=written,
        devices=len(bulk.devices),
        seconds=time.monotonic() - start,
        db_bytes=int(size_row[0]) if size_row else 0,
    )


def _copy_statement(table: str, columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
