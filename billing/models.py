"""Tables of the billing host (the biller that posts bill payments exactly once).

Portable between SQLite and PostgreSQL: plain strings for codes and statuses (guarded by CHECK
constraints rather than native enums), ``BigInteger`` amounts in minor units, timezone-aware
timestamps written in UTC. The schema itself is created by the hand-written alembic revisions
in :mod:`billing.migrations`; these classes must stay in step with them (a test compares the
two).

No PAN is stored in clear anywhere: cards and postings keep an HMAC-SHA256 of the PAN (keyed by
the caller, see :func:`billing.store.BillingStore.seed_demo_data`) and the masked form
``first 6 + '*' + last 4``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.db import NAMING_CONVENTION

CARD_ACTIVE: Final = "active"
CARD_BLOCKED: Final = "blocked"
BILL_OPEN: Final = "open"
BILL_PAID: Final = "paid"
POSTING_POSTED: Final = "posted"
POSTING_REVERSED: Final = "reversed"
SOURCE_ONLINE: Final = "online"
SOURCE_ADVICE: Final = "advice"
DEFAULT_CURRENCY: Final = "360"  # ISO 4217 numeric code of the Indonesian rupiah

# SQLite only auto-increments a column declared exactly "INTEGER PRIMARY KEY".
_BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (the default for every timestamp column)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of the billing tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Customer(Base):
    """A bill holder."""

    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Card(Base):
    """A payment card of a customer, known only by a keyed hash and its masked form."""

    __tablename__ = "cards"
    __table_args__ = (
        CheckConstraint(f"status IN ('{CARD_ACTIVE}', '{CARD_BLOCKED}')", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: HMAC-SHA256 hex digest of the PAN under the card-data key (64 chars).
    pan_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: First 6 and last 4 digits, the rest ``*`` (at most 19 chars, the longest PAN).
    pan_masked: Mapped[str] = mapped_column(String(19))
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    #: PIN verification key index (which PVK computed the PVV).
    pvki: Mapped[str] = mapped_column(String(1))
    #: PIN verification value (4 digits, VISA PVV method).
    pvv: Mapped[str] = mapped_column(String(4))
    status: Mapped[str] = mapped_column(String(10), default=CARD_ACTIVE, server_default=CARD_ACTIVE)


class Bill(Base):
    """A bill issued by a biller to a customer, payable exactly once (until reversed)."""

    __tablename__ = "bills"
    __table_args__ = (
        CheckConstraint(f"status IN ('{BILL_OPEN}', '{BILL_PAID}')", name="status"),
        CheckConstraint("amount_due >= 0", name="amount_due"),
    )

    bill_number: Mapped[str] = mapped_column(String(20), primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"), index=True)
    #: Short biller code: "PLN" (electricity), "PDAM" (water), "TELCO"...
    biller: Mapped[str] = mapped_column(String(10))
    #: Amount in minor units of ``currency``.
    amount_due: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(
        String(3), default=DEFAULT_CURRENCY, server_default=DEFAULT_CURRENCY
    )
    status: Mapped[str] = mapped_column(String(4), default=BILL_OPEN, server_default=BILL_OPEN)
    paid_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Posting(Base):
    """One payment credited to a bill; reversed postings are kept (marked) for the audit trail.

    ``idempotency_key`` is unique: a payment can be posted at most once whatever happens. The
    partial unique index ``ux_postings_posted_bill`` backs the bill's status with a second
    guard: at most one *posted* (not reversed) posting per bill, even if a code path forgot to
    lock the bill.
    """

    __tablename__ = "postings"
    __table_args__ = (
        Index(
            "ux_postings_posted_bill",
            "bill_number",
            unique=True,
            sqlite_where=text(f"status = '{POSTING_POSTED}'"),
            postgresql_where=text(f"status = '{POSTING_POSTED}'"),
        ),
        CheckConstraint(f"source IN ('{SOURCE_ONLINE}', '{SOURCE_ADVICE}')", name="source"),
        CheckConstraint(f"status IN ('{POSTING_POSTED}', '{POSTING_REVERSED}')", name="status"),
    )

    id: Mapped[int] = mapped_column(_BigId, primary_key=True, autoincrement=True)
    bill_number: Mapped[str] = mapped_column(ForeignKey("bills.bill_number"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    rrn: Mapped[str] = mapped_column(String(12))  # field 37, retrieval reference number
    stan: Mapped[str] = mapped_column(String(6))  # field 11, system trace audit number
    terminal_id: Mapped[str] = mapped_column(String(16))  # field 41 (8 in the standard)
    acquirer_id: Mapped[str] = mapped_column(String(11))  # field 32, up to 11 digits
    pan_masked: Mapped[str] = mapped_column(String(19))
    pan_hash: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(6))
    status: Mapped[str] = mapped_column(
        String(8), default=POSTING_POSTED, server_default=POSTING_POSTED
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    reversed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ProcessedRequest(Base):
    """The first outcome of every request that can change something, replayed on repeats.

    ``request_digest`` is a SHA-256 hex digest of the request's business content: a repeat with
    the same key and digest gets the stored answer back; the same key with another digest is a
    duplicate transmission. ``response_json`` is a small JSON object of response fields.
    """

    __tablename__ = "processed_requests"

    idempotency_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    mti: Mapped[str] = mapped_column(String(4))
    request_digest: Mapped[str] = mapped_column(String(64))
    response_code: Mapped[str] = mapped_column(String(2))
    response_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Ledger(Base):
    """The ledger's identity: one row (``id`` 1) made when a network's ledger is created.

    Billing compares it with the marker in its data directory at start and before every
    commit (:mod:`billing.ledger`), so that a deleted or swapped database is noticed.
    """

    __tablename__ = "ledger"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ledger_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
