"""The acquirer's table: the transactions started through its HTTP API.

A row is written before the request goes out and completed with the answer, so
``GET /transactions/{id}`` shows a payment whose answer never came as ``pending`` or
``unknown`` rather than losing it. The PAN is stored masked only.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.store.db import NAMING_CONVENTION


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Transaction(Base):
    __tablename__ = "transactions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10))  # inquiry | payment | reversal
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
