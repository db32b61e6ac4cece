"""The gateway's tables: the transaction journal.

Every request the gateway receives from an acquirer gets a journal row before it is
forwarded and the row is completed with the outcome, so an operator (and, later,
reconciliation) can see what the switch did with each transaction. The PAN is kept as a
masked copy and a keyed hash only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import NAMING_CONVENTION


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JournalEntry(Base):
    """One request seen by the gateway and what became of it."""

    __tablename__ = "journal"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    idempotency_key: Mapped[str] = mapped_column(String(64), index=True)
    mti: Mapped[str] = mapped_column(String(4))
    processing_code: Mapped[str | None] = mapped_column(String(6))
    stan: Mapped[str] = mapped_column(String(6))
    rrn: Mapped[str | None] = mapped_column(String(12), index=True)
    terminal_id: Mapped[str | None] = mapped_column(String(8))
    acquirer_id: Mapped[str | None] = mapped_column(String(11))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    bill_number: Mapped[str | None] = mapped_column(String(32))
    pan_masked: Mapped[str | None] = mapped_column(String(19))
    pan_hash: Mapped[str | None] = mapped_column(String(64))
    #: approved | declined | unknown (68: outcome unknown) | failed (91/96)
    status: Mapped[str] = mapped_column(String(10))
    response_code: Mapped[str | None] = mapped_column(String(2))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[float | None]
