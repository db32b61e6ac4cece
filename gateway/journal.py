"""The gateway's transaction journal: one row per answered request.

:func:`journal_row` builds a row (pure), :class:`Journal` reads and writes the table
(synchronous, in a worker thread), :class:`JournalWriter` commits each row before the
answer leaves, many rows per commit.
:func:`status_of` maps a response code to the journal status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from gateway.models import JournalEntry
from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_FINANCIAL,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    PC_BILL_PAYMENT,
    idempotency_key,
    original_key,
)
from shared.pan import PanHasher, mask_pan
from shared.store.db import DatabaseError, engine_of, transaction
from shared.store.db_thread import DbThread
from shared.store.group_commit import GroupCommit
from shared.store.raw import RawConnections, SqlText


def status_of(code: str) -> str:
    """approved (00), unknown (68: the upstream may have posted it), failed (91, 96), declined."""
    if code == RC.APPROVED:
        return "approved"
    if code == RC.LATE_RESPONSE:
        return "unknown"
    if code in (RC.ISSUER_INOPERATIVE, RC.SYSTEM_MALFUNCTION):
        return "failed"
    return "declined"


@dataclass(frozen=True, slots=True)
class JournalView:
    """A journal row as shown to operators (no PAN, masked only)."""

    id: int
    mti: str
    rrn: str | None
    stan: str
    terminal_id: str | None
    bill_number: str | None
    amount: int | None
    pan_masked: str | None
    status: str
    response_code: str | None
    received_at: datetime
    duration_ms: float | None


def journal_row(
    msg: Mapping[str, str],
    code: str,
    *,
    received_at: datetime,
    duration_ms: float,
    pan_hash: PanHasher,
) -> dict[str, Any]:
    """The journal row of one answered request (pure: no I/O)."""
    pan = msg.get("2")
    amount = msg.get("4")
    return {
        "idempotency_key": idempotency_key(msg)[:64],
        "mti": msg["t"],
        "processing_code": msg.get("3"),
        "stan": msg.get("11", ""),
        "rrn": msg.get("37"),
        "terminal_id": msg.get("41"),
        "acquirer_id": msg.get("32"),
        "amount": int(amount) if amount and amount.isdigit() else None,
        "currency": msg.get("49"),
        "bill_number": msg.get("48"),
        "pan_masked": mask_pan(pan) if pan else None,
        "pan_hash": pan_hash(pan) if pan else None,
        "status": status_of(code),
        "response_code": code,
        "received_at": received_at,
        "completed_at": datetime.now(UTC),
        "duration_ms": round(duration_ms, 3),
        "original_key": _original_key(msg),
    }


def _original_key(msg: Mapping[str, str]) -> str | None:
    """The payment a reversal undoes (from field 90), so reconciliation can pair them."""
    if msg.get("t") not in (MTI_REVERSAL, MTI_REVERSAL_REPEAT) or "90" not in msg:
        return None
    try:
        return original_key(msg)[:64]
    except ValueError:  # a malformed field 90 was answered 30; nothing to pair
        return None


#: The journal's columns in the order of the raw insert below (the keys of journal_row).
_COLUMNS = (
    "idempotency_key",
    "mti",
    "processing_code",
    "stan",
    "rrn",
    "terminal_id",
    "acquirer_id",
    "amount",
    "currency",
    "bill_number",
    "pan_masked",
    "pan_hash",
    "status",
    "response_code",
    "received_at",
    "completed_at",
    "duration_ms",
    "original_key",
)
_TIMESTAMPS = frozenset({"received_at", "completed_at"})
# The insert and the veto query as SQL text on the raw DB-API (shared.store.raw): a journal
# write is on every answer's path, and SQLAlchemy's per-statement work cost more than the
# database's.
_RAW_INSERT = (
    f"INSERT INTO journal ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_RAW_REVERSED_AMONG = (
    "SELECT original_key FROM saf_entries WHERE kind = 'reversal' AND origin = 'gateway'"
    " AND state != 'cancelled' AND original_key {in}"
)


def _is_payment_approval(row: Mapping[str, Any]) -> bool:
    return (
        row.get("mti") == MTI_FINANCIAL
        and row.get("processing_code") == PC_BILL_PAYMENT
        and row.get("response_code") == RC.APPROVED
    )


class Journal:
    """Writes and reads the journal table (synchronous; call from a worker thread)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        engine = engine_of(sessions)
        #: :meth:`write` runs on raw DB-API connections kept for good (shared.store.raw).
        self._raw = RawConnections(engine)
        self._sql = SqlText(engine)
        self._insert = self._sql.sql(_RAW_INSERT)

    def close(self) -> None:
        """Close the raw connections :meth:`write` keeps (it opens new ones if called again)."""
        self._raw.close()

    def write(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Insert ``rows`` in one transaction (one commit for a whole batch).

        Returns the keys of the payment approvals it **vetoed**: an approved ``0200`` whose
        payment the gateway has already decided to reverse (a queued reversal after a 68;
        another replica may have queued it). Such a row is written as 68 (unknown) instead,
        and the caller must answer 68: the reversal will undo whatever billing replayed.

        Raises:
            DatabaseError: the database failed; nothing was written.
        """
        if not rows:
            return set()
        batch = [dict(r) for r in rows]
        approvals = [r["idempotency_key"] for r in batch if _is_payment_approval(r)]
        sql = self._sql
        try:
            with self._raw.transaction(write=True) as tx:
                vetoed: set[str] = set()
                if approvals:
                    found = tx.rows(*sql.in_list(_RAW_REVERSED_AMONG, approvals))
                    vetoed = {row[0] for row in found}
                for r in batch:
                    if r["idempotency_key"] in vetoed and _is_payment_approval(r):
                        r["response_code"] = RC.LATE_RESPONSE.value
                        r["status"] = status_of(RC.LATE_RESPONSE)
                tx.run_many(self._insert, [_values(r, sql) for r in batch])
        except SQLAlchemyError as exc:
            raise DatabaseError(f"journal write failed: {exc}") from exc
        return vetoed

    def find(
        self, *, rrn: str | None = None, stan: str | None = None, limit: int = 50
    ) -> list[JournalView]:
        """Rows by RRN or STAN, newest first."""
        q = select(JournalEntry).order_by(JournalEntry.id.desc()).limit(limit)
        if rrn:
            q = q.where(JournalEntry.rrn == rrn)
        if stan:
            q = q.where(JournalEntry.stan == stan)
        with transaction(self._sessions, write=False) as s:
            return [_view(e) for e in s.scalars(q)]

    def counts(self) -> dict[str, int]:
        """Rows by status."""
        q = select(JournalEntry.status, func.count()).group_by(JournalEntry.status)
        with transaction(self._sessions, write=False) as s:
            return {status: n for status, n in s.execute(q).tuples()}


def _values(row: Mapping[str, Any], sql: SqlText) -> tuple[Any, ...]:
    """A journal row's parameters for the raw insert (timestamps as the dialect takes them)."""
    return tuple(
        sql.timestamp(value) if name in _TIMESTAMPS and value is not None else value
        for name in _COLUMNS
        for value in (row.get(name),)
    )


def _view(e: JournalEntry) -> JournalView:
    return JournalView(
        id=e.id,
        mti=e.mti,
        rrn=e.rrn,
        stan=e.stan,
        terminal_id=e.terminal_id,
        bill_number=e.bill_number,
        amount=e.amount,
        pan_masked=e.pan_masked,
        status=e.status,
        response_code=e.response_code,
        received_at=e.received_at,
        duration_ms=e.duration_ms,
    )


class JournalWriter:
    """Journals answered requests, committed before the answer leaves (group commit).

    The journal is part of the money record: reconciliation proves every approval against
    it, so no 00 may leave the gateway unless its row is durable. :meth:`write` returns only
    once the row is committed; the rows of requests answered at the same moment share one
    transaction and one fsync (:class:`shared.store.group_commit.GroupCommit`), in a
    database thread of its own (``thread``, which its owner starts and stops; separate from
    the service's, so a journal write never waits behind the queue's work).
    """

    def __init__(self, journal: Journal, thread: DbThread, max_batch: int = 1000) -> None:
        self._journal = journal
        self._thread = thread
        thread.at_exit(journal.close)  # the thread's connection ends with the thread
        self._commit: GroupCommit[dict[str, Any], bool] = GroupCommit(self._write, max_batch)

    async def _write(self, rows: Sequence[dict[str, Any]]) -> list[bool]:
        vetoed = await self._thread.call(self._journal.write, rows)
        return [row["idempotency_key"] in vetoed and _is_payment_approval(row) for row in rows]

    async def write(self, row: dict[str, Any]) -> bool:
        """Commit ``row``; True when its approval was vetoed (see :meth:`Journal.write`).

        Raises:
            DatabaseError: the row could not be written.
        """
        return await self._commit.submit(row)
