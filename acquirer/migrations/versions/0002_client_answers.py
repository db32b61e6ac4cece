"""Transactions: the channel (API or terminal) and the transaction's keys.

Terminal pass-through is recorded from now on (one row per answer given to a terminal), so
reconciliation can prove every 00 a client was given. Existing rows are API rows; their
keys are computed from the stored fields (32|41|11|7), and a reversal's original key from
the payment it names.

Revision ID: a0002
Revises: a0001
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a0002"
down_revision: str | Sequence[str] | None = "a0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("transactions") as batch:
        batch.add_column(sa.Column("channel", sa.String(8), nullable=False, server_default="api"))
        batch.add_column(sa.Column("idempotency_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("original_key", sa.String(64), nullable=True))
        batch.create_index("ix_transactions_idempotency_key", ["idempotency_key"])
        batch.create_index("ix_transactions_original_key", ["original_key"])
    op.execute(
        "UPDATE transactions SET idempotency_key = "
        "acquirer_id || '|' || terminal_id || '|' || stan || '|' || transmitted"
    )
    op.execute(
        "UPDATE transactions SET original_key = (SELECT o.idempotency_key FROM transactions o "
        "WHERE o.id = transactions.original_id) WHERE kind = 'reversal'"
    )


def downgrade() -> None:
    with op.batch_alter_table("transactions") as batch:
        batch.drop_index("ix_transactions_original_key")
        batch.drop_index("ix_transactions_idempotency_key")
        batch.drop_column("original_key")
        batch.drop_column("idempotency_key")
        batch.drop_column("channel")
