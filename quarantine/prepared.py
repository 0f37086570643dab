"""The hot path's statements, run on SQLite's DB-API cursor.

For one client's mail, about half of the store thread's CPU went to SQLAlchemy's
execution machinery, not to SQLite: building an execution context, looking up the
compiled form, processing and then tearing down each of the seven statements a
message makes. A `Prepared` is a Core statement compiled once per dialect, with
each bind's processor taken from the column type's dialect implementation: the
same SQL and the same stored values (datetimes, JSON, enums) as the Core path,
executed straight on the cursor of the session's connection, inside the session's
transaction. On other drivers (PostgreSQL) it runs through SQLAlchemy as before.

On the cursor, a failure is the driver's own exception (`sqlite3.Error`), not
SQLAlchemy's wrapper of it, and the engine's `echo` and event listeners do not see
these statements: callers catch `Exception` (a failed commit is a 451).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import UpdateBase

_Processor = Callable[[Any], Any] | None
_REQUIRED = object()


@dataclass(frozen=True, slots=True)
class _Compiled:
    sql: str
    binds: tuple[tuple[str, _Processor, Any], ...]  # name, processor, value if fixed


def direct(conn: Connection) -> bool:
    """Whether `Prepared` statements run on the DB-API cursor of this connection."""
    return conn.dialect.driver == "pysqlite"


class Prepared:
    """`statement`, compiled once per dialect; `columns`: an INSERT's columns, which
    must name every column that has a Python-side default (no defaults are run)."""

    def __init__(self, statement: UpdateBase, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self._columns = list(columns) if columns is not None else None
        # Per engine's dialect (its JSON serializer, say), not keeping it alive.
        self._compiled: weakref.WeakKeyDictionary[Dialect, _Compiled] = weakref.WeakKeyDictionary()

    def compiled(self, dialect: Dialect) -> _Compiled:
        found = self._compiled.get(dialect)
        if found is None:
            found = self._compiled[dialect] = self._compile(dialect)
        return found

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled: Any = self.statement.compile(dialect=dialect, column_keys=self._columns)
        if compiled.insert_prefetch or compiled.update_prefetch:
            missing = [c.key for c in (*compiled.insert_prefetch, *compiled.update_prefetch)]
            raise ValueError(f"give the values of columns with defaults: {', '.join(missing)}")
        if "POSTCOMPILE" in compiled.string:
            raise ValueError("an expanding IN list is not prepared: bind it as one JSON array")
        binds = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            fixed = _REQUIRED if bind.required else bind.effective_value
            binds.append((name, processor, fixed))
        return _Compiled(compiled.string, tuple(binds))

    @staticmethod
    def params(compiled: _Compiled, values: Mapping[str, Any]) -> tuple[Any, ...]:
        out = []
        for name, processor, fixed in compiled.binds:
            value = values[name] if fixed is _REQUIRED else values.get(name, fixed)
            out.append(value if processor is None else processor(value))
        return tuple(out)

    def execute(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run for each row (an executemany), returning nothing."""
        if not rows:
            return
        if direct(conn):
            cursor, compiled = _cursor(conn), self.compiled(conn.dialect)
            if len(rows) == 1:
                cursor.execute(compiled.sql, self.params(compiled, rows[0]))
            else:
                cursor.executemany(compiled.sql, [self.params(compiled, row) for row in rows])
            return
        conn.execute(self.statement, rows[0] if len(rows) == 1 else list(rows))

    def returning(
        self, conn: Connection, rows: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Any, ...]]:
        """Run for each row; what RETURNING gave, row for row, as plain tuples (on
        SQLite the driver's values, unprocessed: return ids, strings and numbers)."""
        if not rows:
            return []
        if direct(conn):
            cursor, compiled = _cursor(conn), self.compiled(conn.dialect)
            found: list[tuple[Any, ...]] = []
            for row in rows:  # SQLite's executemany returns nothing
                cursor.execute(compiled.sql, self.params(compiled, row))
                found.extend(tuple(r) for r in cursor.fetchall())
            return found
        parameters = rows[0] if len(rows) == 1 else list(rows)
        return [tuple(r) for r in conn.execute(self.statement, parameters).all()]


def _cursor(conn: Connection) -> Any:
    return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
