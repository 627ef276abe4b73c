"""Core statements that run on SQLite's DB-API connection directly.

An enrollment's write transaction is five statements. Executed through
SQLAlchemy Core each costs ≈ 40-80 µs of Python (execution context, parameter
processing, result setup) against ≈ 10 µs for the statement itself in
``sqlite3``; that was ≈ 0.2 ms of the server's CPU per enrollment
(bench/README.md). A ``Prepared`` statement is compiled once per dialect and,
on SQLite, executed on the connection's DB-API cursor, inside the same
transaction SQLAlchemy began.

The values still go through the statement's own bind processors (the column
types' SQLite processors and ``UtcDateTime``), so the rows stored are the
same as Core would store; ``tests/store/test_prepared.py`` compares them.
Rows read come back as the driver returns them, so a statement may select
only columns that need no conversion (strings, integers, bytes); compiling
one that selects, say, a ``UtcDateTime`` raises ``TypeError``. Errors are
``sqlite3``'s own, not wrapped by SQLAlchemy. On any other dialect the Core
statement is executed as usual.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, Executable

from estkit.store.unavailable import classify

_NO_DEFAULT = object()


class Cursor(Protocol):
    """What callers use of either result: ``sqlite3.Cursor`` or Core's ``CursorResult``."""

    rowcount: int

    def fetchone(self) -> Sequence[Any] | None: ...

    def fetchall(self) -> Sequence[Sequence[Any]]: ...


class _Compiled:
    def __init__(self, statement: Executable, dialect: Dialect, columns: Sequence[str]) -> None:
        assert isinstance(statement, ClauseElement)
        # Rows come back as the driver gives them: no column may need converting.
        for column in getattr(statement, "exported_columns", ()):
            if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
                raise TypeError(f"column {column.name!r} needs SQLAlchemy to convert it: use Core")
        compiled = cast(
            SQLCompiler, statement.compile(dialect=dialect, column_keys=list(columns) or None)
        )
        self.sql = str(compiled)
        self.binds: list[tuple[str, Callable[[Any], Any] | None, Any]] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            default = _NO_DEFAULT if bind.required else bind.effective_value
            self.binds.append((name, process, default))

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        out = []
        for name, process, default in self.binds:
            value = params.get(name, default)
            if value is _NO_DEFAULT:
                raise KeyError(f"no value for bind parameter {name!r}")
            out.append(process(value) if process is not None else value)
        return out


class Prepared:
    """A Core statement, executed on SQLite's DB-API connection (see the module's doc).

    ``columns``: for an ``insert()`` without ``.values()``, the columns every
    execution supplies (all of them are then in the compiled statement).
    """

    def __init__(self, statement: Executable, *, columns: Sequence[str] = ()) -> None:
        self.statement = statement
        self._columns = tuple(columns)
        self._sqlite: _Compiled | None = None

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Cursor:
        params = params or {}
        if conn.dialect.name != "sqlite":
            return conn.execute(self.statement, dict(params))  # type: ignore[return-value]
        compiled = self._sqlite
        if compiled is None:  # a race here only compiles twice
            compiled = self._sqlite = _Compiled(self.statement, conn.dialect, self._columns)
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            cursor: Cursor = driver.execute(compiled.sql, compiled.values(params))
        except sqlite3.Error as exc:  # SQLAlchemy's handle_error hook does not see these
            unavailable = classify(exc)
            if unavailable is not None:
                raise unavailable from exc
            raise
        return cursor
