"""Database plumbing shared by every paylab service (billing, gateway, acquirer).

The helpers here know nothing about any service's tables. They build an engine with the
settings a money-moving service needs, run a service's alembic migrations from code (no
``alembic.ini``), and hand out sessions and transactions.

Supported URLs:

* SQLite **files**, e.g. ``sqlite:///var/billing.db`` (relative to the working directory) or
  ``sqlite:////srv/paylab/billing.db``. In-memory SQLite (``sqlite://``,
  ``sqlite:///:memory:``, ``mode=memory``) is rejected: every pooled connection would see a
  different, empty database, and a service that loses its ledger on restart is not a ledger.
* PostgreSQL through psycopg 3, e.g. ``postgresql+psycopg://user@/paylab?host=/run/postgresql``.
  Any other SQLAlchemy URL is passed through with the generic settings.

Transactions on SQLite: Python's ``sqlite3`` module normally decides on its own when to emit
``BEGIN`` and always uses a *deferred* one. A deferred transaction that reads and then writes
can fail at once with "database is locked" when another connection wrote in between (WAL
snapshot conflicts are not retried by ``busy_timeout``). So :func:`make_engine` takes the
``BEGIN`` away from ``sqlite3`` and emits it itself, and a transaction opened with
:func:`transaction` ``(write=True)`` starts with ``BEGIN IMMEDIATE``: it queues for the single
write lock up front (waiting up to ``busy_timeout``) and can then never fail half-way for
lock reasons. Readers keep using deferred transactions and never block in WAL mode. On
PostgreSQL the flag has no effect; row locks (``SELECT ... FOR UPDATE``) and unique
constraints are the caller's tools there.
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import PaylabError

__all__ = [
    "NAMING_CONVENTION",
    "SQLITE_BEGIN_OPTION",
    "SQLITE_BUSY_TIMEOUT_MS",
    "WRITE_EXECUTION_OPTIONS",
    "DatabaseError",
    "DatabaseFault",
    "connection_transaction",
    "engine_of",
    "fault_of",
    "is_sqlite",
    "make_engine",
    "session_factory",
    "table_of",
    "transaction",
    "upgrade",
]

#: Constraint and index names, spelled out so hand-written migrations create the same ones.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Connection execution option read by the SQLite ``begin`` hook: the kind of ``BEGIN`` to emit.
SQLITE_BEGIN_OPTION: Final = "paylab_sqlite_begin"

#: Execution options that mark a connection as a writer (``BEGIN IMMEDIATE`` on SQLite).
WRITE_EXECUTION_OPTIONS: Final[Mapping[str, str]] = {SQLITE_BEGIN_OPTION: "IMMEDIATE"}

_BEGIN_MODES: Final = frozenset({"DEFERRED", "IMMEDIATE", "EXCLUSIVE"})

#: Milliseconds a SQLite connection waits for a lock before giving up with "database is locked".
SQLITE_BUSY_TIMEOUT_MS: Final = 5000


class DatabaseError(PaylabError):
    """An infrastructure failure of the database (unreachable, locked, broken schema...).

    Raised instead of SQLAlchemy's or alembic's own exceptions at the public boundary of the
    stores, so callers have one type to catch and turn into a "system malfunction" answer.
    Business outcomes (declines) are never reported through this exception.
    """


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC. A naive value is taken as UTC: every timestamp paylab stores is UTC,
    and SQLite gives a timezone-aware column back without its zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_iso(value: datetime) -> str:
    """ISO 8601 in UTC with its offset (``2026-12-07T00:22:50.579191+00:00``), naive or not."""
    return as_utc(value).isoformat()


def is_sqlite(engine: Engine) -> bool:
    """True when ``engine`` talks to SQLite."""
    return engine.dialect.name == "sqlite"


def make_engine(url: str | URL) -> Engine:
    """Create an engine configured for a paylab service.

    For a SQLite file URL:

    * the parent directory of the database file is created if missing;
    * every new connection gets ``PRAGMA busy_timeout=5000`` (wait for locks instead of failing
      at once), ``journal_mode=WAL`` (readers do not block the writer and vice versa),
      ``synchronous=FULL`` and ``foreign_keys=ON`` (SQLite ignores foreign keys unless asked);
    * ``BEGIN`` is emitted by SQLAlchemy, not by ``sqlite3`` (see the module docstring), so
      DDL is transactional and writers can ask for ``BEGIN IMMEDIATE``.

    ``synchronous=FULL`` rather than the usual WAL companion ``NORMAL``: with ``NORMAL`` a commit
    is durable only at the next checkpoint, so a power cut can silently drop the last payments
    that were already answered "approved". A posted payment must survive anything after its
    response was sent, and one fsync per commit is a cheap price at simulator volumes.

    Other URLs get ``pool_pre_ping=True`` so a connection dropped by a database restart is
    replaced instead of failing the next request.

    Raises:
        ValueError: for an in-memory SQLite URL, which services do not support (each pooled
            connection would open its own empty database).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)

    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise ValueError(
            f"in-memory SQLite is not supported for services, use a file URL: {parsed!r}"
        )
    if not database.startswith("file:"):
        # A "file:" URI (uri=true) is the user's own business; a plain path we can prepare.
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    engine = create_engine(parsed)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _connection_record: Any) -> None:
    # Stop sqlite3 from emitting BEGIN (and from committing before DDL); _sqlite_on_begin
    # emits it instead.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first, so that switching to WAL waits for a concurrent opener.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = str(conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")).upper()
    if mode not in _BEGIN_MODES:
        raise ValueError(f"unknown SQLite BEGIN mode {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to ``engine``.

    ``expire_on_commit=False`` so objects (and the frozen results built from them) stay
    readable after the transaction that loaded them has committed and the session is closed.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session], *, write: bool) -> Iterator[Session]:
    """One session, one transaction: committed when the block ends, rolled back if it raises.

    With ``write=True`` the transaction is declared a writer before its first statement
    (``BEGIN IMMEDIATE`` on SQLite, a no-op elsewhere), so on SQLite it waits for the write
    lock up front rather than failing with "database is locked" half-way through.
    """
    with sessions() as session, session.begin():
        if write:
            # Must be the session's first use: options are applied when the connection begins.
            session.connection(execution_options=dict(WRITE_EXECUTION_OPTIONS))
        yield session


def table_of(model: Any) -> Table:
    """The :class:`~sqlalchemy.Table` of an ORM model, for Core statements on hot paths."""
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model!r} is not mapped to a table")
    return table


def engine_of(sessions: sessionmaker[Session]) -> Engine:
    """The engine a session factory is bound to (TypeError if it is bound to none)."""
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine):
        raise TypeError("the session factory must be bound to an engine")
    return engine


@contextmanager
def connection_transaction(engine: Engine, *, write: bool) -> Iterator[Connection]:
    """:func:`transaction` on a Core connection of ``engine``, without an ORM session.

    For hot paths that only run Core statements: a session's unit of work, identity map and
    events cost more CPU than a small transaction's statements. Same contract otherwise:
    committed when the block ends, rolled back if it raises, ``write=True`` starts with
    ``BEGIN IMMEDIATE`` on SQLite.
    """
    with engine.connect() as conn:
        if write:
            conn.execution_options(**WRITE_EXECUTION_OPTIONS)
        with conn.begin():
            yield conn


def upgrade(engine_or_url: Engine | str, script_location: str) -> None:
    """Bring a database to the newest schema revision (``alembic upgrade head``).

    ``script_location`` names the alembic environment, normally as a package resource such as
    ``"billing:migrations"`` so it works from a wheel as well as from a checkout. No
    ``alembic.ini`` is read: the configuration is built here and the connection is handed to
    the environment's ``env.py`` through ``config.attributes["connection"]``.

    Safe to call at every start: at head it does nothing, and the whole upgrade runs in one
    transaction that is serialized against other starters (``BEGIN IMMEDIATE`` on SQLite, a
    transaction-scoped advisory lock on PostgreSQL), so two processes starting together do not
    both try to create the tables. Migrations run in that same transaction, so a failing
    migration leaves the schema as it was on both backends (both have transactional DDL).
    On SQLite foreign keys are off while migrating (batch table rebuilds need it), checked with
    ``PRAGMA foreign_key_check`` before commit, and on again before the connection is reused.

    When given a URL, an engine is built with :func:`make_engine` and disposed of afterwards.

    Raises:
        DatabaseError: when the database cannot be reached or a migration fails.
    """
    if isinstance(engine_or_url, Engine):
        _upgrade(engine_or_url, script_location)
        return
    engine = make_engine(engine_or_url)
    try:
        _upgrade(engine, script_location)
    finally:
        engine.dispose()


def _upgrade(engine: Engine, script_location: str) -> None:
    config = Config()
    config.set_main_option("script_location", script_location)
    # Silences alembic's "no path_separator" warning; no multi-path options are used.
    config.set_main_option("path_separator", "os")
    try:
        with engine.connect() as connection:
            # Connection.execution_options() applies in place (SQLAlchemy 2).
            connection.execution_options(**WRITE_EXECUTION_OPTIONS)
            if is_sqlite(engine):
                with _sqlite_foreign_keys_off(connection), connection.begin():
                    _run_upgrade(connection, config, script_location)
                    _sqlite_check_foreign_keys(connection)
            else:
                with connection.begin():
                    _run_upgrade(connection, config, script_location)
    except (SQLAlchemyError, CommandError) as exc:
        raise DatabaseError(f"schema upgrade of {engine.url!r} failed: {exc}") from exc


def _run_upgrade(connection: Connection, config: Config, script_location: str) -> None:
    if connection.dialect.name == "postgresql":
        # Released at commit/rollback. The key is derived from the script location so
        # different services sharing one server do not wait for each other.
        lock_key = zlib.crc32(f"paylab-migrations:{script_location}".encode())
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key})
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


@contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """Foreign keys off for the duration of a migration, on again afterwards.

    Batch migrations rebuild a table (create a copy, drop the original, rename), which SQLite
    only allows with foreign keys off: dropping a referenced table otherwise fails or cascades.
    The pragma is ignored inside a transaction, so it is sent on the raw connection (which is
    in autocommit mode, see make_engine) before BEGIN; integrity is then checked explicitly
    by _sqlite_check_foreign_keys before commit.
    """
    raw = connection.connection.driver_connection
    if raw is None:  # pragma: no cover - a live connection always has one
        raise DatabaseError("no DBAPI connection to migrate on")
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        # Back on before the connection returns to the pool.
        raw.execute("PRAGMA foreign_keys=ON")


def _sqlite_check_foreign_keys(connection: Connection) -> None:
    violations = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if violations:
        raise DatabaseError(f"migration left foreign key violations: {violations[:10]}")


class DatabaseFault:
    """A switch that makes an engine's database unavailable, for fault injection.

    :meth:`attach` hooks ``before_cursor_execute`` of an engine: while :attr:`down`, every
    statement (``BEGIN`` included) raises :class:`sqlalchemy.exc.OperationalError`
    ("injected fault: database unavailable"), exactly what a lost database gives, so every
    code path meets a real failure. Switching back up needs no restart: the next statement
    runs normally. See ``docs/chaos.md``.
    """

    MESSAGE: Final = "injected fault: database unavailable"

    def __init__(self) -> None:
        self.down = False
        #: Statements refused while down.
        self.refused = 0

    def attach(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._before_cursor_execute)
        # Hot paths on the raw DB-API (shared.store.raw) bypass the hook: they ask here.
        _FAULTS[engine] = self

    def set_down(self, down: bool) -> None:
        self.down = down

    def view(self) -> dict[str, Any]:
        return {"down": self.down, "refused": self.refused}

    def _before_cursor_execute(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any
    ) -> None:
        if self.down:
            self.refused += 1
            raise OperationalError(statement, parameters, ConnectionError(self.MESSAGE))


_FAULTS: weakref.WeakKeyDictionary[Engine, DatabaseFault] = weakref.WeakKeyDictionary()


def fault_of(engine: Engine) -> DatabaseFault | None:
    """The :class:`DatabaseFault` attached to ``engine``, if any."""
    return _FAULTS.get(engine)
