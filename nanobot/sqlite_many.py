"""Statements run for many rows a second on SQLite, their rows handed to the driver as they are.

SQLAlchemy's executemany prepares every row of a compiled statement in Python: a dict of all the
statement's parameters, then each value through its type's processors (an aware datetime goes
through :class:`~nanobot.models.UTCDateTime` and SQLite's ``DATETIME``: two calls and a dict of
seven fields). In the steady state (200 tasks at 1 s, sampled by the holder of the interpreter
lock) that preparation was half of the outcome batches' CPU. A :class:`SqliteMany` compiles its
statement once, and each call hands tuples of plain values, in the statement's parameter order,
straight to ``cursor.executemany`` through :meth:`Connection.exec_driver_sql`: in the caller's
transaction, with the engine's events. :func:`sqlite_time` writes an aware datetime as the
processors would, character for character (a slot's time is its identity in ``task_runs``: the
same instant written two ways would be two slots).

Only for SQLite; PostgreSQL's batches have statements of their own (``unnest()`` of arrays).

Threads: any. The compiled text is built at the first call in a process (two threads racing
build it twice, the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any, Final, cast

from sqlalchemy import Connection, CursorResult
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

# SQLAlchemy's storage format of SQLite's DATETIME (sqlalchemy.dialects.sqlite.DATETIME), the
# type under UTCDateTime there: always the microseconds, never an offset (the values are UTC).
_DATETIME_TEXT: Final = "%04d-%02d-%02d %02d:%02d:%02d.%06d"


def sqlite_time(value: datetime | None) -> str | None:
    """``value`` (aware) as nanobot's SQLite columns hold it: the UTC time, ISO text."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: nanobot stores aware UTC datetimes only")
        value = value.astimezone(UTC)
    return _DATETIME_TEXT % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


class SqliteMany:
    """A Core statement run as one executemany at the driver level, on SQLite.

    ``names`` are the statement's bound parameters in the order of each row's values; the
    literals of the statement (an outcome compared with ``'running'``) are bound by themselves.
    Values go to the driver unconverted: datetimes as :func:`sqlite_time` text.
    """

    def __init__(self, statement: ClauseElement, names: Sequence[str]) -> None:
        self._statement = statement
        self._names = tuple(names)
        self._prepared: tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]] | None = None

    def _prepare(self) -> tuple[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]]:
        dialect = sqlite.dialect()
        compiled = cast(SQLCompiler, self._statement.compile(dialect=dialect))
        order = list(compiled.positiontup or [])
        unknown = sorted(set(self._names) - set(order))
        if unknown:
            raise ValueError(f"the statement has no parameter {', '.join(unknown)}: {compiled}")
        # The statement's literals, bound once here as SQLAlchemy would bind them.
        literals: dict[str, Any] = {}
        for name in dict.fromkeys(order):
            if name in self._names:
                continue
            bind = compiled.binds[name]
            process = bind.type.bind_processor(dialect)
            value = bind.effective_value
            literals[name] = process(value) if process is not None else value
        # A row is its values, then the literals; each position of the statement takes one.
        constants = tuple(literals.values())
        index = {name: i for i, name in enumerate(self._names)}
        index.update({name: len(self._names) + i for i, name in enumerate(literals)})
        getter = itemgetter(*(index[name] for name in order))
        if len(order) == 1:
            # itemgetter of one position gives the item itself, not a tuple of one.
            return compiled.string, lambda row: (getter(row + constants),)
        if not constants:
            return compiled.string, getter
        return compiled.string, lambda row: getter(row + constants)

    def execute(self, conn: Connection, rows: Iterable[tuple[Any, ...]]) -> CursorResult[Any]:
        """Run the statement once per row of ``rows``, in ``conn``'s transaction."""
        if self._prepared is None:
            self._prepared = self._prepare()
        sql, arrange = self._prepared
        return conn.exec_driver_sql(sql, [arrange(row) for row in rows])
