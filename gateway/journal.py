"""The gateway's transaction journal: synchronous, one short transaction per call.

Called from a worker thread. A row is opened when a request arrives and closed with its
response code; :func:`status_of` maps the response code to the journal status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from gateway.models import JournalEntry
from shared.codes import RC
from shared.db import transaction
from shared.messages import idempotency_key
from shared.pan import PanHasher, mask_pan


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


class Journal:
    """Writes and reads the journal table."""

    def __init__(self, sessions: sessionmaker[Session], pan_hash: PanHasher) -> None:
        self._sessions = sessions
        self._pan_hash = pan_hash

    def open(self, msg: Mapping[str, str]) -> int:
        """Record an arriving request; returns the row id to :meth:`close` later."""
        pan = msg.get("2")
        amount = msg.get("4")
        entry = JournalEntry(
            idempotency_key=idempotency_key(msg)[:64],
            mti=msg["t"],
            processing_code=msg.get("3"),
            stan=msg.get("11", ""),
            rrn=msg.get("37"),
            terminal_id=msg.get("41"),
            acquirer_id=msg.get("32"),
            amount=int(amount) if amount and amount.isdigit() else None,
            currency=msg.get("49"),
            bill_number=msg.get("48"),
            pan_masked=mask_pan(pan) if pan else None,
            pan_hash=self._pan_hash(pan) if pan else None,
            status="received",
            received_at=datetime.now(UTC),
        )
        with transaction(self._sessions, write=True) as s:
            s.add(entry)
            s.flush()
            return entry.id

    def close(self, entry_id: int, code: str, duration_ms: float) -> None:
        """Record the response code sent back for row ``entry_id``."""
        with transaction(self._sessions, write=True) as s:
            entry = s.get(JournalEntry, entry_id)
            if entry is None:
                return
            entry.response_code = code
            entry.status = status_of(code)
            entry.completed_at = datetime.now(UTC)
            entry.duration_ms = round(duration_ms, 3)

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

    def ping(self) -> bool:
        try:
            with transaction(self._sessions, write=False) as s:
                s.execute(select(1))
            return True
        except Exception:
            return False


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
