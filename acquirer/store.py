"""The acquirer's transaction records, synchronous (called from a worker thread)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from acquirer.models import Transaction
from shared.pan import mask_pan
from shared.store.db import transaction


class TransactionStore:
    """Open a record before sending, complete it with the answer, read it back."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

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
        "created_at": tx.created_at.isoformat(),
        "completed_at": tx.completed_at.isoformat() if tx.completed_at else None,
        **details,
    }
