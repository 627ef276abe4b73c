"""The PostgreSQL connection pool: a pooled connection the database closed while it sat
idle is replaced before use (the caller never sees it); one closed while the pool was
busy fails its request once as ``Unavailable`` (503 + Retry-After upstream, never a raw
driver error), and the next request reconnects by itself. So does a statement psycopg
prepared before a schema change made it stale.

The database closes the connections with ``pg_terminate_backend`` from a connection of
its own, as an administrator, an ``idle_session_timeout`` or a restart would.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from backends import postgresql_only
from estkit.store import AuditEvent, SqlStore
from estkit.store.errors import Unavailable

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)

pytestmark = postgresql_only


def _terminate_store_connections(database_url: str) -> int:
    """Close every other session on the database, waiting until each has ended."""
    admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with admin.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000))"
                    " FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).scalar_one()
            )
    finally:
        admin.dispose()


def _read(store: SqlStore) -> object:
    return store.get_device("dev-1")


def _write(store: SqlStore) -> object:
    event = AuditEvent(at=NOW, actor="cli:op", action="test", outcome="ok")
    store.audit(event)
    return None


OPERATIONS = [_read, _write]
OPERATION_IDS = ["read", "write"]


def _store_with_pooled_connections(database_url: str, *, idle_ping_after: float) -> SqlStore:
    store = SqlStore.open(database_url, idle_ping_after=idle_ping_after)
    _read(store)  # the event loop's connection
    _write(store)  # the writer thread's
    return store


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
def test_a_connection_closed_while_idle_is_replaced_before_use(
    database_url: str, operation: Callable[[SqlStore], object]
) -> None:
    # Threshold 0: every connection taken from the pool has been idle long enough.
    store = _store_with_pooled_connections(database_url, idle_ping_after=0.0)
    try:
        assert _terminate_store_connections(database_url) >= 1
        operation(store)  # no error: the ping found the dead connection first
        assert store.verify_audit_chain()[1] is None
    finally:
        store.close()


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
def test_a_connection_closed_while_busy_fails_once_unavailable_then_reconnects(
    database_url: str, operation: Callable[[SqlStore], object]
) -> None:
    # No connection sits idle for an hour here: none is pinged.
    store = _store_with_pooled_connections(database_url, idle_ping_after=3600.0)
    try:
        assert _terminate_store_connections(database_url) >= 1
        with pytest.raises(Unavailable):
            operation(store)
        # The failure invalidated the whole pool: the read and the write reconnect.
        _read(store)
        _write(store)
        assert store.verify_audit_chain()[1] is None
    finally:
        store.close()


def test_a_schema_change_under_a_prepared_statement_fails_once_unavailable(
    database_url: str,
) -> None:
    """psycopg prepares a statement on its 5th run on a connection; a column type
    changed since (a migration while the node serves) makes PostgreSQL refuse it on
    that connection for good, unless the connection is replaced."""
    store = SqlStore.open(database_url)
    try:
        for _ in range(8):  # one connection: prepared, then run prepared
            _read(store)
        admin = sa.create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql("ALTER TABLE devices ALTER COLUMN status TYPE text")
        admin.dispose()
        with pytest.raises(Unavailable, match="schema changed"):
            _read(store)
        _read(store)
    finally:
        store.close()


def test_reads_keep_the_statements_psycopg_prepared(database_url: str) -> None:
    """A read runs in autocommit: no ROLLBACK after it, on which psycopg would drop the
    statements it prepared (after 5 runs on a connection)."""
    store = SqlStore.open(database_url)
    try:
        for _ in range(8):  # one connection: prepared on the 6th run
            _read(store)
        with store._engine.connect() as conn:  # the same pooled connection
            prepared = conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements")
            assert prepared.scalar_one() >= 1
    finally:
        store.close()


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
def test_every_pooled_connection_busy_is_unavailable_not_a_raw_timeout(
    database_url: str, monkeypatch: pytest.MonkeyPatch, operation: Callable[[SqlStore], object]
) -> None:
    """A slow or partitioned database holds every connection: the next request is
    answered 503 after ``POOL_TIMEOUT``, not a 500 from SQLAlchemy's TimeoutError."""
    import estkit.store.sql as sql

    monkeypatch.setattr(sql, "POOL_TIMEOUT", 0.2)
    store = SqlStore.open(database_url)
    pool = store._engine.pool
    held = [store._engine.connect() for _ in range(pool.size() + pool._max_overflow)]  # type: ignore[attr-defined]
    try:
        with pytest.raises(Unavailable, match="every database connection"):
            operation(store)
    finally:
        for conn in held:
            conn.close()
        store.close()
