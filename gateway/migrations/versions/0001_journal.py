"""Gateway journal.

Revision ID: g0001
Revises:
Create Date: 2026-11-22 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "g0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "journal",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("mti", sa.String(4), nullable=False),
        sa.Column("processing_code", sa.String(6), nullable=True),
        sa.Column("stan", sa.String(6), nullable=False),
        sa.Column("rrn", sa.String(12), nullable=True),
        sa.Column("terminal_id", sa.String(8), nullable=True),
        sa.Column("acquirer_id", sa.String(11), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("bill_number", sa.String(32), nullable=True),
        sa.Column("pan_masked", sa.String(19), nullable=True),
        sa.Column("pan_hash", sa.String(64), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("response_code", sa.String(2), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_journal"),
    )
    op.create_index("ix_journal_idempotency_key", "journal", ["idempotency_key"])
    op.create_index("ix_journal_rrn", "journal", ["rrn"])


def downgrade() -> None:
    op.drop_index("ix_journal_rrn", table_name="journal")
    op.drop_index("ix_journal_idempotency_key", table_name="journal")
    op.drop_table("journal")
