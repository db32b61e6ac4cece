"""The acquirer's transaction records, synchronous (called from a worker thread).

:func:`terminal_row` builds the record of one answer given to a terminal (pure);
:class:`TransactionStore` writes and reads the table.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from acquirer.models import CHANNEL_API, CHANNEL_TERMINAL, Transaction
from shared.iso.messages import (
    MTI_ADVICE,
    MTI_ADVICE_REPEAT,
    MTI_REVERSAL,
    MTI_REVERSAL_REPEAT,
    idempotency_key,
    original_key,
)
from shared.pan import mask_pan
from shared.store.db import connection_transaction, engine_of, table_of, transaction, utc_iso

_INSERT = insert(table_of(Transaction))


def kind_of(mti: str) -> str:
    """The record kind of a state-changing request MTI: payment, advice or reversal."""
    if mti in (MTI_REVERSAL, MTI_REVERSAL_REPEAT):
        return "reversal"
    if mti in (MTI_ADVICE, MTI_ADVICE_REPEAT):
        return "advice"
    return "payment"


def _original_key(msg: Mapping[str, str]) -> str | None:
    if msg.get("t") not in (MTI_REVERSAL, MTI_REVERSAL_REPEAT) or "90" not in msg:
        return None
    try:
        return original_key(msg)[:64]
    except ValueError:  # a malformed field 90 (answered 30 upstream): nothing to pair
        return None


def _amount(msg: Mapping[str, str]) -> int:
    value = msg.get("4", "")
    return int(value) if value.isdigit() else 0


def terminal_row(
    msg: Mapping[str, str],
    code: str,
    status: str,
    *,
    received_at: datetime,
    answered_at: datetime,
) -> dict[str, Any]:
    """The record of one answer (``code``, ``status``) given to a terminal for ``msg``."""
    pan = msg.get("2")
    return {
        "id": uuid.uuid4().hex,
        "kind": kind_of(msg["t"]),
        "mti": msg["t"],
        "stan": msg.get("11", "")[:6],
        "rrn": msg.get("37", "")[:12],
        "transmitted": msg.get("7", "")[:10],
        "acquirer_id": msg.get("32", "")[:11],
        "terminal_id": msg.get("41", "")[:8],
        "bill_number": msg.get("48", "")[:32],
        "amount": _amount(msg),
        "currency": msg.get("49", "")[:3],
        "pan_masked": mask_pan(pan) if pan else None,
        "status": status,
        "response_code": code[:2],
        "response_json": None,
        "original_id": None,
        "created_at": received_at,
        "completed_at": answered_at,
        "channel": CHANNEL_TERMINAL,
        "idempotency_key": idempotency_key(msg)[:64],
        "original_key": _original_key(msg),
    }


class TransactionStore:
    """Open a record before sending, complete it with the answer, read it back."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._engine = engine_of(sessions)

    def record_answers(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Insert terminal answers (:func:`terminal_row`) in one transaction."""
        if rows:
            with connection_transaction(self._engine, write=True) as conn:
                conn.execute(_INSERT, [dict(r) for r in rows])

    def open(self, kind: str, msg: Mapping[str, str], original_id: str | None = None) -> str:
        """Record an outgoing request; returns its id (32 hex characters)."""
        pan = msg.get("2")
        tx = Transaction(
            id=uuid.uuid4().hex,
            kind=kind,
            mti=msg["t"],
            stan=msg["11"],
            rrn=msg["37"],
            transmitted=msg["7"],
            acquirer_id=msg["32"],
            terminal_id=msg["41"],
            bill_number=msg["48"],
            amount=int(msg["4"]),
            currency=msg["49"],
            pan_masked=mask_pan(pan) if pan else None,
            status="pending",
            original_id=original_id,
            created_at=datetime.now(UTC),
            channel=CHANNEL_API,
            idempotency_key=idempotency_key(msg)[:64],
            original_key=_original_key(msg),
        )
        with transaction(self._sessions, write=True) as s:
            s.add(tx)
        return tx.id

    def complete(
        self, tx_id: str, status: str, code: str | None, details: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Record the outcome; returns the record as :meth:`get` would (one round trip)."""
        with transaction(self._sessions, write=True) as s:
            tx = s.get(Transaction, tx_id)
            if tx is None:
                return None
            tx.status = status
            tx.response_code = code
            tx.response_json = json.dumps(dict(details))
            tx.completed_at = datetime.now(UTC)
            return to_json(tx)

    def get(self, tx_id: str) -> dict[str, Any] | None:
        """The record as the API shows it, or None."""
        with transaction(self._sessions, write=False) as s:
            tx = s.get(Transaction, tx_id)
            return None if tx is None else to_json(tx)

    def find_by_rrn(self, rrn: str, limit: int = 20) -> list[dict[str, Any]]:
        """The records of RRN ``rrn`` (API and terminal), newest first, as :meth:`get`."""
        with transaction(self._sessions, write=False) as s:
            rows = s.scalars(
                select(Transaction)
                .where(Transaction.rrn == rrn)
                .order_by(Transaction.created_at.desc())
                .limit(limit)
            )
            return [to_json(tx) for tx in rows]

    def approved_reversal(self, tx_id: str) -> dict[str, Any] | None:
        """The approved reversal of payment ``tx_id`` (the latest), as :meth:`get` shows it,
        or None when it has none: a second reversal is answered from this record."""
        with transaction(self._sessions, write=False) as s:
            tx = s.scalars(
                select(Transaction)
                .where(
                    Transaction.original_id == tx_id,
                    Transaction.kind == "reversal",
                    Transaction.status == "approved",
                )
                .order_by(Transaction.created_at.desc())
                .limit(1)
            ).first()
            return None if tx is None else to_json(tx)

    def original_fields(self, tx_id: str) -> dict[str, str] | None:
        """The fields of a recorded payment that a reversal's field 90 needs."""
        with transaction(self._sessions, write=False) as s:
            tx = s.get(Transaction, tx_id)
            if tx is None or tx.kind != "payment":
                return None
            return {
                "t": tx.mti,
                "11": tx.stan,
                "7": tx.transmitted,
                "32": tx.acquirer_id,
                "41": tx.terminal_id,
                "4": f"{tx.amount:012d}",
                "48": tx.bill_number,
            }


def to_json(tx: Transaction) -> dict[str, Any]:
    details = json.loads(tx.response_json) if tx.response_json else {}
    return {
        "id": tx.id,
        "kind": tx.kind,
        "status": tx.status,
        "approved": tx.status == "approved",
        "response_code": tx.response_code,
        "rrn": tx.rrn,
        "stan": tx.stan,
        "bill": tx.bill_number,
        "amount": tx.amount,
        "currency": tx.currency,
        "pan": tx.pan_masked,
        "original_id": tx.original_id,
        "created_at": utc_iso(tx.created_at),
        "completed_at": utc_iso(tx.completed_at) if tx.completed_at else None,
        **details,
    }
