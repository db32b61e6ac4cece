"""Acquirer transactions.

Revision ID: a0001
Revises:
Create Date: 2026-11-22 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "transactions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("mti", sa.String(4), nullable=False),
        sa.Column("stan", sa.String(6), nullable=False),
        sa.Column("rrn", sa.String(12), nullable=False),
        sa.Column("transmitted", sa.String(10), nullable=False),
        sa.Column("acquirer_id", sa.String(11), nullable=False),
        sa.Column("terminal_id", sa.String(8), nullable=False),
        sa.Column("bill_number", sa.String(32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("pan_masked", sa.String(19), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("response_code", sa.String(2), nullable=True),
        sa.Column("response_json", sa.Text(), nullable=True),
        sa.Column("original_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_transactions"),
    )
    op.create_index("ix_transactions_rrn", "transactions", ["rrn"])


def downgrade() -> None:
    op.drop_index("ix_transactions_rrn", table_name="transactions")
    op.drop_table("transactions")
