"""The gateway's tables: the transaction journal and the store-and-forward queue.

Every request the gateway receives from an acquirer gets a journal row before it is
forwarded and the row is completed with the outcome, so an operator (and, later,
reconciliation) can see what the switch did with each transaction. The PAN is kept as a
masked copy and a keyed hash only.

The store-and-forward (SAF) queue (:class:`SafEntry`, managed by :mod:`gateway.saf_store`) holds
the advices (stand-in approvals) and reversals the gateway owes billing until billing has
answered them. The message to send is kept sealed (AES-GCM, :mod:`shared.store.vault`); the clear
columns hold only what operators and the queue's own rules need, never a clear PAN or a PIN
block.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.store.db import NAMING_CONVENTION


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
    duration_ms: Mapped[float | None] = mapped_column(Float)
    #: For a reversal (0420/0421): the idempotency key of the payment it undoes (field 90).
    original_key: Mapped[str | None] = mapped_column(String(64), index=True)


class SafEntry(Base):
    """One advice or reversal waiting to be delivered to billing, or what became of it.

    ``state`` moves queued -> in_flight -> done (or back to queued for another attempt, or
    dead when attempts run out); operators can retry dead entries and cancel any that is not
    finished. ``payload`` is the ISO-8583 message to send (first-attempt MTI), sealed with the
    vault key ``key_id`` and the entry's ``idempotency_key`` as additional authenticated data.
    """

    __tablename__ = "saf_entries"
    __table_args__ = (
        CheckConstraint(
            "state IN ('queued', 'in_flight', 'done', 'dead', 'cancelled')", name="state"
        ),
        CheckConstraint("kind IN ('advice', 'reversal')", name="kind"),
        # The claim query: due entries by state, highest priority first, then FIFO.
        Index("ix_saf_entries_state", "state", "priority", "id"),
        # The per-terminal head rule and operators' per-terminal views.
        Index("ix_saf_entries_terminal_id", "terminal_id", "state"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    #: Key of the queued message (:func:`shared.iso.messages.idempotency_key`): one entry per key.
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    #: For a reversal: the key of the transaction it undoes (from field 90).
    original_key: Mapped[str | None] = mapped_column(String(64), index=True)
    #: advice | reversal
    kind: Mapped[str] = mapped_column(String(8))
    #: Who decided the message: ``gateway`` (a stand-in advice, a reversal after a 68 or of
    #: a withheld approval) or ``acquirer`` (an acquirer's own advice or reversal the gateway
    #: took over). A gateway reversal means the acquirer was never answered 00 for the
    #: original, so a repeat of it is answered 68 again and never forwarded.
    origin: Mapped[str | None] = mapped_column(String(8))
    #: Higher is sent first (reversals before advices).
    priority: Mapped[int] = mapped_column(Integer)
    #: queued | in_flight | done | dead | cancelled
    state: Mapped[str] = mapped_column(String(10))
    #: First-attempt MTI (0220 or 0420); later attempts send the repeat MTI (0221, 0421).
    mti: Mapped[str] = mapped_column(String(4))
    terminal_id: Mapped[str] = mapped_column(String(16))
    acquirer_id: Mapped[str] = mapped_column(String(11))
    stan: Mapped[str] = mapped_column(String(6))
    rrn: Mapped[str | None] = mapped_column(String(12), index=True)
    bill_number: Mapped[str | None] = mapped_column(String(32))
    amount: Mapped[int | None] = mapped_column(BigInteger)
    currency: Mapped[str | None] = mapped_column(String(3))
    pan_masked: Mapped[str | None] = mapped_column(String(19))
    #: Keyed PAN hash, for per-customer stand-in limits.
    pan_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    #: Vault key id that sealed ``payload``.
    key_id: Mapped[str] = mapped_column(String(16))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Billing's last answer; once done, the answer that ended it.
    response_code: Mapped[str | None] = mapped_column(String(2))
    last_error: Mapped[str | None] = mapped_column(String(200))
    #: A late 0210 seen for the original transaction after this entry was queued.
    late_response_code: Mapped[str | None] = mapped_column(String(2))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
