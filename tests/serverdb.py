"""The database behind a server's data directory, on either backend, for tests that
read what the server stored or tamper with it as an attacker with database access would.

Statements are SQLAlchemy ``text()`` with ``:name`` parameters, so one test reads both
SQLite and PostgreSQL.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from estkit.server.config import load_config
from estserver import set_config
from pgcluster import bin_dir


def database_url(data_dir: Path) -> str:
    return load_config(data_dir).database_url


@contextmanager
def connect(data_dir: Path) -> Iterator[sa.Connection]:
    """One transaction on the server's database, committed when the block ends."""
    engine = sa.create_engine(database_url(data_dir), poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def dump(data_dir: Path) -> bytes:
    """Everything the server's database holds, as bytes: the SQLite files, or a
    ``pg_dump`` of the PostgreSQL database."""
    url = database_url(data_dir)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    tools = bin_dir()
    assert tools is not None
    return subprocess.run(
        [tools / "pg_dump", url.replace("postgresql+psycopg://", "postgresql://")],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


def rows(data_dir: Path, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with connect(data_dir) as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]


def copy_data_dir(src: Path, dst: Path, database: str | None) -> Path:
    """``src`` copied to ``dst`` with a consistent copy of its database: SQLite's backup
    API into the copy's own file, or (PostgreSQL) every row dumped into ``database``,
    an empty migrated database the copy's config then names."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("estkit.db*"))
    source = database_url(src)
    if source.startswith("sqlite:///"):
        with (
            closing(sqlite3.connect(source.removeprefix("sqlite:///"))) as conn,
            closing(sqlite3.connect(dst / "estkit.db")) as target,
        ):
            conn.backup(target)
        return dst
    assert database is not None, "a PostgreSQL copy needs a database to copy into"
    engine = sa.create_engine(database, poolclass=sa.NullPool)
    try:
        with engine.begin() as conn:
            tables = sa.inspect(conn).get_table_names()
            emptied = ", ".join(f'"{t}"' for t in tables if t != "alembic_version")
            conn.exec_driver_sql(f"TRUNCATE {emptied}")
    finally:
        engine.dispose()
    tools = bin_dir()
    assert tools is not None
    libpq = source.replace("postgresql+psycopg://", "postgresql://")
    dump = subprocess.run(
        [tools / "pg_dump", "--data-only", "--exclude-table=alembic_version", libpq],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    subprocess.run(
        [tools / "psql", "-q", "-v", "ON_ERROR_STOP=1",
         database.replace("postgresql+psycopg://", "postgresql://")],
        input=dump, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    set_config(dst, "database", "url", f'"{database}"')
    return dst
