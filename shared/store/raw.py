"""Hot-path transactions on the raw DB-API connection (``sqlite3``, psycopg), without
SQLAlchemy's per-statement machinery.

A SQLAlchemy Core statement, even compiled once and cached, costs tens of microseconds of
Python per execution (parameter processing, result metadata, events, a pool checkout per
transaction, a ``SELECT 1`` pre-ping on PostgreSQL); the database call itself costs a few.
:class:`RawConnections` keeps the hot path's connections for good (taken from the engine's
pool once, with its ``connect`` settings: on SQLite the pragmas of
:func:`~shared.store.db.make_engine`, ``synchronous=FULL`` included) and
:meth:`RawConnections.transaction` runs plain SQL text on them, written per dialect once by
the caller (:class:`SqlText` converts placeholders and writes ``IN`` lists).

The contract is the one of :func:`~shared.store.db.connection_transaction`: committed when
the block ends, rolled back if it raises; ``write=True`` starts with ``BEGIN IMMEDIATE`` on
SQLite (a deferred ``BEGIN`` otherwise; psycopg opens its transaction itself). DB-API
errors come out as SQLAlchemy's exception types (``IntegrityError``, ``OperationalError``...)
so callers keep one set of types to catch, and :class:`~shared.store.db.DatabaseFault`
refuses these statements too while it is down. SQLAlchemy stays for the schema,
migrations and everything off the hot path.

Connections: one per concurrent user. A caller takes an idle connection (or opens one) for
its transaction and gives it back afterwards, so a service whose calls run in one
database thread uses exactly one; a connection found broken is closed rather than reused,
and on PostgreSQL one idle for a while is pinged before use (see ``RawConnections._take``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import suppress
from datetime import datetime
from types import TracebackType
from typing import Any, Final

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from shared.store.db import DatabaseFault, fault_of, is_sqlite

__all__ = ["RawConnections", "RawTransaction", "SqlText"]

#: How SQLAlchemy stores a ``DateTime`` on SQLite (text, the value's own fields), so rows
#: written here read back through the ORM exactly as if SQLAlchemy had written them.
_SQLITE_DATETIME: Final = "%Y-%m-%d %H:%M:%S.%f"


class SqlText:
    """SQL text written once per dialect: ``?`` placeholders, ``{in}`` for an ``IN`` list.

    On SQLite ``{in}`` becomes ``IN (?, ?, ...)`` with the list padded (with its last value)
    to the next power of two, so a few statement texts serve every batch size and stay in
    ``sqlite3``'s statement cache; on PostgreSQL it becomes ``= ANY(%s)`` with the list as
    one array parameter, and ``?`` becomes ``%s``.
    """

    def __init__(self, engine: Engine) -> None:
        self.sqlite = is_sqlite(engine)
        self._cache: dict[tuple[str, int], str] = {}

    def sql(self, text: str) -> str:
        """``text`` (without ``{in}``) with this dialect's placeholders."""
        return text if self.sqlite else text.replace("?", "%s")

    def in_list(
        self, text: str, values: Sequence[Any], *before: Any
    ) -> tuple[str, tuple[Any, ...]]:
        """``text`` with its ``{in}`` written for ``values`` (not empty), and its parameters:
        ``before`` (the values of the ``?`` placeholders ahead of ``{in}``), then the list."""
        if not values:
            raise ValueError("an IN list needs at least one value")
        if not self.sqlite:
            key = (text, 0)
            sql = self._cache.get(key)
            if sql is None:
                sql = self._cache[key] = text.replace("?", "%s").format(**{"in": "= ANY(%s)"})
            return sql, (*before, list(values))
        size = 1 << (len(values) - 1).bit_length()
        key = (text, size)
        sql = self._cache.get(key)
        if sql is None:
            sql = self._cache[key] = text.format(**{"in": f"IN ({', '.join('?' * size)})"})
        padded = (*values, *((values[-1],) * (size - len(values))))
        return sql, (*before, *padded)

    def timestamp(self, value: datetime) -> Any:
        """A ``DateTime`` parameter as SQLAlchemy would send it on this dialect."""
        return value.strftime(_SQLITE_DATETIME) if self.sqlite else value


class RawTransaction:
    """One transaction on a raw DB-API connection (see :meth:`RawConnections.transaction`)."""

    __slots__ = ("_fault", "connection", "sqlite")

    def __init__(self, connection: Any, sqlite: bool, fault: DatabaseFault | None) -> None:
        #: The DB-API connection, for what the methods below do not cover.
        self.connection = connection
        self.sqlite = sqlite
        self._fault = fault

    def _check_fault(self, statement: str) -> None:
        fault = self._fault
        if fault is not None and fault.down:
            fault.refused += 1
            raise OperationalError(statement, None, ConnectionError(DatabaseFault.MESSAGE))

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """All rows of a query, as tuples."""
        self._check_fault(sql)
        cursor = self.connection.execute(sql, params)
        rows: list[Any] = cursor.fetchall()
        return rows

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """The first column of the first row, or None."""
        self._check_fault(sql)
        row = self.connection.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def run(self, sql: str, params: Sequence[Any] = ()) -> None:
        """A statement whose result is not needed."""
        self._check_fault(sql)
        self.connection.execute(sql, params)

    def run_many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        """One statement for each parameter set (``executemany``)."""
        self._check_fault(sql)
        if self.sqlite:
            self.connection.executemany(sql, params)
        else:
            with self.connection.cursor() as cursor:
                cursor.executemany(sql, params)

    def insert_ids(self, sql: str, params: Sequence[Sequence[Any]]) -> list[int]:
        """Insert one row per parameter set; the generated ids, in parameter order.

        ``sql`` is an ``INSERT`` without ``RETURNING``: on SQLite each row's ``lastrowid``
        is read (a multi-row ``RETURNING`` gives no order guarantee there), on PostgreSQL
        ``RETURNING id`` is added and the rows are sent in one pipelined ``executemany``.
        """
        self._check_fault(sql)
        if self.sqlite:
            cursor = self.connection.cursor()
            ids = []
            for row in params:
                cursor.execute(sql, row)
                ids.append(cursor.lastrowid)
            return ids
        with self.connection.cursor() as cursor:
            cursor.executemany(sql + " RETURNING id", params, returning=True)
            ids = []
            while True:
                ids.append(cursor.fetchone()[0])
                if not cursor.nextset():
                    return ids


class RawConnections:
    """Long-lived raw DB-API connections of ``engine`` for hot-path transactions."""

    def __init__(self, engine: Engine, *, ping_after: float = 1.0) -> None:
        self._engine = engine
        self._sqlite = is_sqlite(engine)
        self._dbapi_error: type[Exception] = engine.dialect.loaded_dbapi.Error
        #: Idle connections with the monotonic time they were given back.
        self._idle: list[tuple[Any, float]] = []
        #: A server connection idle longer than this is pinged before use (see _take).
        self._ping_after = ping_after

    def transaction(self, *, write: bool) -> _Transaction:
        """One transaction on a connection of this pool's own (see the module docstring),
        as a context manager giving the :class:`RawTransaction`: committed when the block
        ends normally, rolled back when it raises (the exception goes on).

        Raises:
            sqlalchemy.exc.DBAPIError: (a subclass of) for any DB-API failure.
        """
        return _Transaction(self, write)

    def _failed(self, connection: Any, exc: BaseException) -> None:
        """After a failure in a transaction on ``connection``: roll back, keep or drop the
        connection, and raise the DB-API error wrapped as SQLAlchemy's. Returns for any
        other exception (the caller lets it go on)."""
        # A connection goes back unless it is broken: a lost unique-key race (the retry
        # path) or a failed check must not cost a reconnection.
        kept = self._rollback(connection) and not (
            isinstance(exc, self._dbapi_error)
            and self._engine.dialect.is_disconnect(exc, connection, None)  # type: ignore[arg-type]
        )
        if kept:
            self._give_back(connection)
        else:
            self._discard(connection)
        if isinstance(exc, self._dbapi_error):
            raise DBAPIError.instance(
                "", None, exc, self._dbapi_error, dialect=self._engine.dialect
            ) from exc

    def close(self) -> None:
        """Close the idle connections; later transactions open new ones."""
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            self._discard(connection)

    def _take(self) -> Any:
        """An idle connection, or a new one. A server connection (PostgreSQL) that has
        been idle for ``ping_after`` seconds is pinged first, as the pool's pre-ping would:
        a database restarted meanwhile costs a reconnection, not a failed transaction.
        Under load connections are never that idle, so the hot path pays no round trip."""
        while True:
            try:
                connection, since = self._idle.pop()  # atomic: one caller per connection
            except IndexError:
                break
            if self._sqlite or time.monotonic() - since < self._ping_after:
                return connection
            try:
                connection.execute("SELECT 1")
                connection.rollback()
            except Exception:
                self._discard(connection)
                continue
            return connection
        fairy = self._engine.raw_connection()  # the pool's connect hooks apply
        connection = fairy.driver_connection
        fairy.detach()  # ours for good: the pool neither counts nor recycles it
        return connection

    def _give_back(self, connection: Any) -> None:
        self._idle.append((connection, time.monotonic()))

    def _rollback(self, connection: Any) -> bool:
        """Roll back after a failure; False when the connection is unusable."""
        try:
            connection.rollback()
        except Exception:
            return False
        return not getattr(connection, "closed", False)

    @staticmethod
    def _discard(connection: Any) -> None:
        with suppress(Exception):
            connection.close()


class _Transaction:
    """The context manager of :meth:`RawConnections.transaction`: a plain class rather
    than a generator-based one, which costs several calls more per transaction."""

    __slots__ = ("_connection", "_pool", "_write")

    def __init__(self, pool: RawConnections, write: bool) -> None:
        self._pool = pool
        self._write = write
        self._connection: Any = None

    def __enter__(self) -> RawTransaction:
        pool = self._pool
        fault = fault_of(pool._engine)
        connection = self._connection = pool._take()
        tx = RawTransaction(connection, pool._sqlite, fault)
        if pool._sqlite:
            try:
                tx.run("BEGIN IMMEDIATE" if self._write else "BEGIN")
            except BaseException as exc:
                pool._failed(connection, exc)
                raise
        return tx

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        connection, self._connection = self._connection, None
        pool = self._pool
        if kind is not None:
            pool._failed(connection, exc)  # type: ignore[arg-type]
            return  # not a DB-API error: it goes on as it is
        try:
            connection.commit()
        except BaseException as failure:
            pool._failed(connection, failure)
            raise
        pool._give_back(connection)
