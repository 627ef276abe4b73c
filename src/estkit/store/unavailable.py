"""Which database errors mean "cannot take the request now" (``Unavailable``).

A full disk, a read-only or locked database, an I/O error, a lost
connection or a prepared statement that a schema change made stale are not
the request's fault and not a bug: the caller answers 503 + Retry-After and
writes nothing. Everything else stays what it was.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from estkit.store.errors import Unavailable

log = logging.getLogger("estkit.store")

# SQLite primary result codes (the low byte of extended codes).
_SQLITE = {
    5: "database is locked (busy)",
    6: "database table is locked",
    7: "out of memory",
    8: "database is read-only",
    10: "disk I/O error",
    13: "database or disk is full",
    14: "database file cannot be opened",
}
# PostgreSQL SQLSTATE classes and codes (Appendix A of its manual).
_PG_CLASSES = {
    "08": "connection lost",
    "53": "insufficient resources (disk, memory or connections)",
    "57": "server shutting down or not accepting connections",
}
_PG_CODES = {
    "25006": "database is read-only",
    "55P03": "lock not available",
    "40001": "serialization failure",
    "40P01": "deadlock detected",
}


def classify(exc: BaseException) -> Unavailable | None:
    """An ``Unavailable`` for ``exc`` (a DB-API error, possibly wrapped), or None."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, sqlite3.Error):
        code = getattr(orig, "sqlite_errorcode", None)
        what = _SQLITE.get(code & 0xFF) if isinstance(code, int) else None
        if what is None and isinstance(orig, sqlite3.OperationalError):
            text = str(orig).lower()
            if "disk is full" in text or "readonly" in text or "locked" in text:
                what = str(orig)
        return Unavailable(what) if what else None
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        what = _PG_CODES.get(sqlstate) or _PG_CLASSES.get(sqlstate[:2])
        return Unavailable(what) if what else None
    if _is_psycopg_operational(orig):
        # No SQLSTATE: the server could not be reached, or went away mid-statement
        # ("connection failed: … Connection refused", "server closed the connection").
        return Unavailable("cannot reach the database")
    if getattr(exc, "connection_invalidated", False):
        return Unavailable("connection lost")
    return None


def _is_psycopg_operational(exc: BaseException) -> bool:
    """A psycopg ``OperationalError`` (without importing the optional driver)."""
    return any(
        cls.__name__ == "OperationalError" and cls.__module__.startswith("psycopg")
        for cls in type(exc).__mro__
    )


def _stale_prepared_statement(exc: BaseException) -> bool:
    """PostgreSQL refusing a statement psycopg prepared before a schema change altered
    what it returns (a migration run while this node serves)."""
    if getattr(exc, "sqlstate", None) != "0A000":  # feature_not_supported
        return False
    # Told apart by where PostgreSQL raised it (its plan cache), not by its message,
    # which lc_messages may translate; the message is the fallback of an old server.
    source = getattr(getattr(exc, "diag", None), "source_file", None) or ""
    return source.endswith("plancache.c") or "cached plan must not change" in str(exc)


def translate_unavailable(context: Any) -> None:
    """SQLAlchemy's ``handle_error`` hook: raise ``Unavailable`` in place of such errors."""
    unavailable = classify(context.original_exception)
    if unavailable is None and context.is_disconnect:
        unavailable = Unavailable("connection lost")
    if _stale_prepared_statement(context.original_exception):
        # Every pooled connection holds the stale statement and would fail on it
        # until it is closed: handled as a lost connection, the pool starts over.
        context.is_disconnect = True
        unavailable = Unavailable("the database schema changed under a prepared statement")
    if unavailable is not None:
        raise unavailable from context.original_exception
