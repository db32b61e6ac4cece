"""Hot-path transactions on the raw DB-API (shared/store/raw.py), on SQLite and PostgreSQL:
commit and rollback, the connection kept and reused, errors as SQLAlchemy's types, the
injected database fault, SQLite's pragmas and BEGIN IMMEDIATE."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from shared.store.db import DatabaseFault, make_engine
from shared.store.raw import RawConnections, SqlText
from tests.support import DATABASE_BACKENDS, empty_database


@pytest.fixture(params=DATABASE_BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    with empty_database(request.param, tmp_path, "raw") as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE items (k VARCHAR(10) PRIMARY KEY, n INTEGER)"))
        try:
            yield engine
        finally:
            engine.dispose()


def count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM items")).scalar_one())


def test_commit_rollback_and_one_connection_reused(engine: Engine) -> None:
    raw, sql = RawConnections(engine), SqlText(engine)
    insert = sql.sql("INSERT INTO items (k, n) VALUES (?, ?)")
    try:
        with raw.transaction(write=True) as tx:
            tx.run_many(insert, [("a", 1), ("b", 2), ("c", 3)])
            first = tx.connection
        with pytest.raises(RuntimeError), raw.transaction(write=True) as tx:
            tx.run(insert, ("d", 4))
            raise RuntimeError("not committed")
        with raw.transaction(write=False) as tx:
            assert tx.connection is first  # kept across transactions, errors included
            rows = tx.rows(*sql.in_list("SELECT k, n FROM items WHERE k {in} ORDER BY k", "abd"))
            assert rows == [("a", 1), ("b", 2)]
            assert tx.scalar(sql.sql("SELECT n FROM items WHERE k = ?"), ("c",)) == 3
            assert tx.scalar(sql.sql("SELECT n FROM items WHERE k = ?"), ("z",)) is None
        assert count(engine) == 3
    finally:
        raw.close()


def test_in_lists_of_every_size_and_sql_text_per_dialect(engine: Engine) -> None:
    raw, sql = RawConnections(engine), SqlText(engine)
    keys = [f"k{n}" for n in range(40)]
    try:
        with raw.transaction(write=True) as tx:
            tx.run_many(sql.sql("INSERT INTO items (k, n) VALUES (?, ?)"), [(k, 1) for k in keys])
        query = "SELECT k FROM items WHERE n = ? AND k {in}"
        with raw.transaction(write=False) as tx:
            for size in (1, 2, 3, 5, 17, 40):
                statement, params = sql.in_list(query, keys[:size], 1)
                assert sorted(r[0] for r in tx.rows(statement, params)) == sorted(keys[:size])
    finally:
        raw.close()
    statement, params = sql.in_list(query, ["a", "b", "c"], 1)
    if sql.sqlite:  # padded to a power of two: few texts for every batch size
        assert statement.endswith("IN (?, ?, ?, ?)") and params == (1, "a", "b", "c", "c")
    else:
        assert statement.endswith("= ANY(%s)") and params == (1, ["a", "b", "c"])
        assert "%s" in statement and "?" not in statement
    with pytest.raises(ValueError):
        sql.in_list(query, [])


def test_insert_ids_in_parameter_order(engine: Engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            ddl = "CREATE TABLE seq (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)"
        else:
            ddl = "CREATE TABLE seq (id BIGSERIAL PRIMARY KEY, v TEXT)"
        conn.execute(text(ddl))
    raw, sql = RawConnections(engine), SqlText(engine)
    try:
        with raw.transaction(write=True) as tx:
            ids = tx.insert_ids(sql.sql("INSERT INTO seq (v) VALUES (?)"), [(v,) for v in "xyz"])
            assert tx.rows(sql.sql("SELECT id, v FROM seq ORDER BY id")) == list(
                zip(ids, "xyz", strict=True)
            )
    finally:
        raw.close()


def test_errors_come_out_as_sqlalchemy_types_and_roll_back(engine: Engine) -> None:
    raw, sql = RawConnections(engine), SqlText(engine)
    insert = sql.sql("INSERT INTO items (k, n) VALUES (?, ?)")
    try:
        with pytest.raises(IntegrityError) as caught, raw.transaction(write=True) as tx:
            tx.run(insert, ("a", 1))
            tx.run(insert, ("a", 2))
        assert isinstance(caught.value.orig, engine.dialect.loaded_dbapi.IntegrityError)
        with (
            pytest.raises((OperationalError, ProgrammingError)),
            raw.transaction(write=False) as tx,
        ):
            tx.rows("SELECT * FROM no_such_table")
        assert count(engine) == 0
        with raw.transaction(write=True) as tx:  # the connection still works
            tx.run(insert, ("a", 3))
        assert count(engine) == 1
    finally:
        raw.close()


def test_a_failed_commit_rolls_back_and_comes_out_as_a_sqlalchemy_error(engine: Engine) -> None:
    # A deferred foreign key is checked at COMMIT: the failure comes from the commit itself.
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE parents (id INTEGER PRIMARY KEY)"))
        conn.execute(
            text(
                "CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER "
                "REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    raw, sql = RawConnections(engine), SqlText(engine)
    orphan = sql.sql("INSERT INTO children (id, parent) VALUES (?, ?)")
    try:
        with pytest.raises(IntegrityError), raw.transaction(write=True) as tx:
            tx.run(orphan, (1, 99))
        with raw.transaction(write=True) as tx:  # rolled back, and the connection works
            assert tx.scalar("SELECT count(*) FROM children") == 0
            tx.run(sql.sql("INSERT INTO parents (id) VALUES (?)"), (99,))
            tx.run(orphan, (1, 99))
        with raw.transaction(write=False) as tx:
            assert tx.scalar("SELECT count(*) FROM children") == 1
    finally:
        raw.close()


def test_a_broken_connection_is_replaced(engine: Engine) -> None:
    raw = RawConnections(engine)
    try:
        with raw.transaction(write=False) as tx:
            broken = tx.connection
        broken.close()  # what a database restart does to a kept connection
        with pytest.raises((OperationalError, ProgrammingError)), raw.transaction(write=False):
            pass
        with raw.transaction(write=False) as tx:
            assert tx.connection is not broken
            assert tx.scalar("SELECT 1") == 1
    finally:
        raw.close()


def test_the_injected_fault_refuses_raw_statements(engine: Engine) -> None:
    fault = DatabaseFault()
    fault.attach(engine)
    raw = RawConnections(engine)
    try:
        fault.set_down(True)
        with (
            pytest.raises(OperationalError, match=DatabaseFault.MESSAGE),
            raw.transaction(write=False) as tx,
        ):
            tx.scalar("SELECT 1")
        assert fault.refused >= 1
        fault.set_down(False)
        with raw.transaction(write=False) as tx:
            assert tx.scalar("SELECT 1") == 1
    finally:
        raw.close()


def test_concurrent_users_get_their_own_connections(engine: Engine) -> None:
    raw = RawConnections(engine)
    inside, release = threading.Barrier(2), threading.Event()
    seen: list[object] = []

    def hold() -> None:
        with raw.transaction(write=False) as tx:
            seen.append(tx.connection)
            inside.wait(10)
            assert release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        inside.wait(10)
        with raw.transaction(write=False) as tx:
            assert tx.connection is not seen[0]
        release.set()
        thread.join(10)
    finally:
        release.set()
        raw.close()


def test_sqlite_connections_keep_the_engines_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/pragmas.db")
    raw, sql = RawConnections(engine), SqlText(engine)
    try:
        with raw.transaction(write=False) as tx:
            assert tx.scalar("PRAGMA synchronous") == 2  # FULL
            assert tx.scalar("PRAGMA journal_mode") == "wal"
            assert tx.scalar("PRAGMA foreign_keys") == 1
            assert tx.scalar("PRAGMA busy_timeout") == 5000
        when = datetime(2026, 12, 7, 1, 2, 3, 456789, tzinfo=UTC)
        assert sql.timestamp(when) == "2026-12-07 01:02:03.456789"  # as SQLAlchemy writes it
    finally:
        raw.close()
        engine.dispose()


def test_sqlite_write_transactions_begin_immediate(tmp_path: Path) -> None:
    """A writer holds the write lock from its BEGIN: another writer's BEGIN IMMEDIATE waits
    (here: fails at once, with no busy timeout) even before the first one has written."""
    engine = make_engine(f"sqlite:///{tmp_path}/lock.db")
    raw = RawConnections(engine)
    other = sqlite3.connect(tmp_path / "lock.db", isolation_level=None, timeout=0)
    try:
        locked = pytest.raises(sqlite3.OperationalError, match="locked")
        with raw.transaction(write=True), locked:
            other.execute("BEGIN IMMEDIATE")
        with raw.transaction(write=False):  # a reader takes no write lock
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()
        raw.close()
        engine.dispose()


@pytest.mark.parametrize("engine", DATABASE_BACKENDS[1:], indirect=True)  # a server only
def test_postgres_a_connection_killed_while_idle_is_replaced_before_use(engine: Engine) -> None:
    """What pool_pre_ping did for the pool: a database restarted while the hot path was idle
    costs a reconnection, not a failed transaction. Without the ping (a connection used
    again at once) the transaction fails and the broken connection is replaced."""
    assert engine.dialect.name == "postgresql"

    def kill(connection: object) -> None:
        pid = connection.info.backend_pid  # type: ignore[attr-defined]
        with engine.connect() as admin:
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    pinging = RawConnections(engine, ping_after=0.0)
    trusting = RawConnections(engine, ping_after=3600.0)
    try:
        killed = []
        for raw in (pinging, trusting):
            with raw.transaction(write=False) as tx:
                killed.append(tx.connection)
            kill(tx.connection)
        with pinging.transaction(write=False) as tx:
            assert tx.connection is not killed[0] and tx.scalar("SELECT 1") == 1
        with pytest.raises(OperationalError), trusting.transaction(write=False) as tx:
            tx.scalar("SELECT 1")
        with trusting.transaction(write=False) as tx:
            assert tx.scalar("SELECT 1") == 1
    finally:
        pinging.close()
        trusting.close()
