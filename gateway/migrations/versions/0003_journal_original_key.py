"""Journal: the original transaction of a reversal.

Revision ID: g0003
Revises: g0002
Create Date: 2026-11-22 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "g0003"
down_revision: str | Sequence[str] | None = "g0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("journal") as batch:
        batch.add_column(sa.Column("original_key", sa.String(64), nullable=True))
        batch.create_index("ix_journal_original_key", ["original_key"])


def downgrade() -> None:
    with op.batch_alter_table("journal") as batch:
        batch.drop_index("ix_journal_original_key")
        batch.drop_column("original_key")
