"""The acquirer's table: what its clients asked and what they were answered.

* ``api``: a transaction started through the HTTP API. The row is written before the
  request goes out and completed with the answer, so ``GET /transactions/{id}`` shows a
  payment whose answer never came as ``pending`` or ``unknown`` rather than losing it.
* ``terminal``: a request relayed from a terminal, one row per answer given (a terminal
  that re-sends gets a row per answer, under the same ``idempotency_key``).

Reconciliation reads both: they are the client's side of every transaction. The PAN is
stored masked only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import NAMING_CONVENTION


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


CHANNEL_API = "api"
CHANNEL_TERMINAL = "terminal"


class Transaction(Base):
    __tablename__ = "transactions"
    __table_args__ = (
        Index("ix_transactions_idempotency_key", "idempotency_key"),
        Index("ix_transactions_original_key", "original_key"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))  # inquiry | payment | advice | reversal
    mti: Mapped[str] = mapped_column(String(4))
    stan: Mapped[str] = mapped_column(String(6))
    rrn: Mapped[str] = mapped_column(String(12), index=True)
    transmitted: Mapped[str] = mapped_column(String(10))  # field 7, for field 90 later
    acquirer_id: Mapped[str] = mapped_column(String(11))
    terminal_id: Mapped[str] = mapped_column(String(8))
    bill_number: Mapped[str] = mapped_column(String(32))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    pan_masked: Mapped[str | None] = mapped_column(String(19))
    #: pending -> approved | declined | unknown (no answer in time) | failed (no link)
    status: Mapped[str] = mapped_column(String(10))
    response_code: Mapped[str | None] = mapped_column(String(2))
    response_json: Mapped[str | None] = mapped_column(Text)
    original_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: api | terminal
    channel: Mapped[str] = mapped_column(String(8), default=CHANNEL_API, server_default="api")
    #: The transaction's key (32|41|11|7), as billing and the gateway know it.
    idempotency_key: Mapped[str | None] = mapped_column(String(64))
    #: A reversal's original transaction key (from field 90).
    original_key: Mapped[str | None] = mapped_column(String(64))
