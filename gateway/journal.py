"""The gateway's transaction journal: one row per answered request.

:func:`journal_row` builds a row (pure), :class:`Journal` reads and writes the table
(synchronous, in a worker thread), :class:`JournalWriter` batches the writes.
:func:`status_of` maps a response code to the journal status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import trio
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.models import JournalEntry
from shared.iso.codes import RC
from shared.iso.messages import (
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    idempotency_key,
    original_key,
)
from shared.pan import PanHasher, mask_pan
from shared.store.db import connection_transaction, engine_of, table_of, transaction


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


_INSERT = insert(table_of(JournalEntry))


class Journal:
    """Writes and reads the journal table (synchronous; call from a worker thread)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._engine = engine_of(sessions)

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert ``rows`` in one transaction (one commit for a whole batch)."""
        if not rows:
            return
        # A Core insert on the table: no session or ORM bulk machinery per batch.
        with connection_transaction(self._engine, write=True) as conn:
            conn.execute(_INSERT, [dict(r) for r in rows])

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
    """Writes journal rows in batches from one task: many requests, one commit.

    :meth:`submit` hands a row over without waiting for the disk; the writer takes every
    row queued since its last commit and writes them in one transaction. The journal is
    the gateway's audit trail, not its ledger (billing's postings are; the
    store-and-forward queue will be the gateway's durable record), so a crash may lose
    the last batch of rows but never a payment. :meth:`flush` waits until everything
    submitted before it is committed: readers call it to see their own writes.
    """

    def __init__(self, journal: Journal, log: Any, max_batch: int = 1000) -> None:
        self._journal = journal
        self._log = log
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[dict[str, Any] | trio.Event](10_000)

    async def submit(self, row: dict[str, Any]) -> None:
        """Queue a row (waits only if 10 000 rows are already waiting: back-pressure)."""
        await self._send.send(row)

    async def flush(self) -> None:
        """Return once every row submitted before this call is committed."""
        done = trio.Event()
        await self._send.send(done)
        await done.wait()

    async def close(self) -> None:
        """Write what is queued and stop the writer."""
        await self.flush()
        await self._send.aclose()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                batch: list[dict[str, Any]] = []
                waiters: list[trio.Event] = []
                item = first
                while True:
                    if isinstance(item, trio.Event):
                        waiters.append(item)
                    else:
                        batch.append(item)
                    if len(batch) >= self._max_batch:
                        break
                    try:
                        item = self._receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await trio.to_thread.run_sync(self._journal.write, batch)
                except Exception:
                    self._log.exception("journal_write_failed", rows=len(batch))
                for w in waiters:
                    w.set()
