"""Billing's ledger identity: a database that vanished or was swapped is never served silently.

Why
    Billing's database *is* the money record. If its SQLite file is deleted while billing
    runs, SQLite keeps writing into the unlinked file: approvals go on, ``/health`` stays
    green, and every posting is lost at the next start. If billing then started on an empty
    database and seeded the demo data again, bills already paid would be payable twice.

How
    * The ``ledger`` table holds one row, a random **ledger id**, made when a network's
      ledger is created (billing's first start on an empty data directory, or
      ``paylab db seed``). Demo data is seeded only then.
    * Billing keeps a **marker** in its data directory, ``billing.ledger``, holding the
      ledger id it serves. At start, :func:`decide` compares the two: an empty database
      where the marker names a ledger means the database was lost or replaced, and billing
      refuses to start (:class:`LedgerLost`) instead of creating a new, empty ledger. The
      operator restores a backup (the ledger id comes back with it) or starts a new ledger on
      purpose (``paylab db seed --new-ledger``).
    * While running, :class:`LedgerGuard` checks before every commit and at every health
      check that the ledger is still the one it opened: the id row (a swapped database),
      and for SQLite the file itself (deleted, or replaced by another file at the same path:
      the path's inode differs from the one opened). Once it fails, billing answers 91 to
      every request and ``/health`` fails until it is restarted.

:func:`decide` is pure; :class:`LedgerGuard` does one ``stat`` and one one-row read.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final, Protocol

from sqlalchemy import Connection, Engine, select

from billing.models import Ledger
from shared.errors import PaylabError
from shared.store.db import is_sqlite, table_of
from shared.store.raw import RawTransaction

#: The marker file in the data directory: the ledger id billing served from it.
MARKER_NAME: Final = "billing.ledger"

_LEDGER = table_of(Ledger)
_READ_ID = select(_LEDGER.c.ledger_id).where(_LEDGER.c.id == 1)
#: The same on a raw DB-API transaction (the hot path's, shared.store.raw); no parameters,
#: so one text serves every dialect.
_READ_ID_SQL = f"SELECT ledger_id FROM {_LEDGER.name} WHERE id = 1"


class LedgerLost(PaylabError):
    """Billing's database is not the ledger it served: deleted, emptied or replaced."""


class Start(StrEnum):
    """What billing does with the database it finds at start (see :func:`decide`)."""

    NEW = "new"  # a new network: create the ledger id and seed the demo data
    ADOPT = "adopt"  # a ledger of an older version without an id: give it one, seed nothing
    SAME = "same"  # the ledger this data directory served: go on


@dataclass(frozen=True, slots=True)
class Decision:
    start: Start
    #: The ledger id to serve (None for NEW and ADOPT: it is made then).
    ledger_id: str | None


def decide(*, db_ledger: str | None, db_has_data: bool, marker: str | None) -> Decision:
    """What to do with the database found at start (pure).

    ``db_ledger`` is the database's ledger id (None: no id row), ``db_has_data`` whether it
    holds any customer, ``marker`` the ledger id this data directory served (None: never).

    Raises:
        LedgerLost: the database is empty or another ledger while the marker names one.
    """
    if db_ledger is None:
        if marker is None:
            return Decision(Start.ADOPT if db_has_data else Start.NEW, None)
        state = "holds another ledger without an id" if db_has_data else "is empty"
        raise LedgerLost(
            f"billing's database {state}, but this data directory served ledger {marker}: "
            "the database was deleted or replaced. Restore it from a backup (paylab db "
            "restore), or start a new ledger on purpose with `paylab db seed --new-ledger`"
        )
    if marker is not None and marker != db_ledger:
        raise LedgerLost(
            f"billing's database holds ledger {db_ledger}, but this data directory served "
            f"ledger {marker}: the database was replaced. Point PAYLAB_BILLING_DB_URL at the "
            "right database, or accept this one with `paylab db seed --new-ledger`"
        )
    return Decision(Start.SAME, db_ledger)


class LedgerStore(Protocol):
    """What :func:`open_ledger` needs of :class:`billing.store.BillingStore`."""

    def ledger_state(self) -> tuple[str | None, bool]: ...

    def create_ledger(self, ledger_id: str, *, replace: bool = False) -> None: ...


def open_ledger(
    store: LedgerStore,
    data_dir: Path,
    seed: Callable[[], object],
    *,
    new_ledger: bool = False,
) -> tuple[Start, str]:
    """Open the ledger billing is to serve: the start it was, and its id.

    Applies :func:`decide` to the database and the marker; a new ledger gets an id and
    ``seed()`` (the demo data) is called for it; the marker is written last. With
    ``new_ledger`` (an operator's ``paylab db seed --new-ledger``) the marker's ledger is
    given up on purpose: the database found is served (seeded if empty), whatever the
    marker said.

    Raises:
        LedgerLost: see :func:`decide` (never with ``new_ledger``).
    """
    db_ledger, has_data = store.ledger_state()
    marker = None if new_ledger else read_marker(data_dir)
    decision = decide(db_ledger=db_ledger, db_has_data=has_data, marker=marker)
    ledger_id = decision.ledger_id
    if ledger_id is None:
        ledger_id = new_ledger_id()
        if decision.start is Start.NEW:
            seed()
        store.create_ledger(ledger_id)
    write_marker(data_dir, ledger_id)
    return decision.start, ledger_id


def new_ledger_id() -> str:
    """A fresh ledger id (32 hex characters)."""
    return secrets.token_hex(16)


def read_ledger_id(conn: Connection | RawTransaction) -> str | None:
    """The database's ledger id, or None when it has none, read in ``conn``'s transaction
    (a SQLAlchemy connection, or a raw one of the hot path)."""
    if isinstance(conn, RawTransaction):
        value = conn.scalar(_READ_ID_SQL)
    else:
        value = conn.execute(_READ_ID).scalar()
    return None if value is None else str(value)


def marker_path(data_dir: Path) -> Path:
    return Path(data_dir) / MARKER_NAME


def read_marker(data_dir: Path) -> str | None:
    """The ledger id this data directory served, or None."""
    try:
        text = marker_path(data_dir).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    return text or None


def write_marker(data_dir: Path, ledger_id: str) -> None:
    """Record ``ledger_id`` as served from ``data_dir`` (atomically: write, fsync, rename)."""
    path = marker_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(ledger_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class LedgerGuard:
    """Checks that the database billing writes to is still the ledger it opened.

    Once a check fails, :attr:`lost` holds the reason for good: a ledger that vanished does
    not come back by itself, and billing must not approve again until an operator restarts
    it (and the start-up rules of :func:`decide` apply).
    """

    def __init__(self, engine: Engine, ledger_id: str) -> None:
        self.ledger_id = ledger_id
        self.lost: str | None = None
        self._path: str | None = None
        self._file: tuple[int, int] | None = None
        if is_sqlite(engine) and engine.url.database:
            self._path = os.path.abspath(engine.url.database)
            self._file = _file_identity(self._path)

    def check_file(self) -> None:
        """Raise :class:`LedgerLost` if the SQLite file was deleted or replaced (one stat)."""
        if self.lost is not None:
            raise LedgerLost(self.lost)
        if self._path is None:
            return
        try:
            now = _file_identity(self._path)
        except FileNotFoundError:
            self._fail(f"billing's database file {self._path} was deleted while in use")
        else:
            if now != self._file:
                self._fail(f"billing's database file {self._path} was replaced while in use")

    def check(self, conn: Connection | RawTransaction) -> None:
        """:meth:`check_file`, then the ledger id read on ``conn`` (inside its transaction)."""
        self.check_file()
        found = read_ledger_id(conn)
        if found != self.ledger_id:
            self._fail(
                f"billing's database holds ledger {found or '(none)'} instead of "
                f"{self.ledger_id}: it was replaced while in use"
            )

    def _fail(self, reason: str) -> None:
        self.lost = reason
        raise LedgerLost(reason)
