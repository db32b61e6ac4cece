"""SAF entries: who decided the queued message (gateway or acquirer).

Existing rows get it from the journal: a reversal whose original was answered 68 by the
gateway, or an advice of a payment (0200) it approved in stand-in, was decided by the
gateway; any other entry carries an acquirer's own message.

Revision ID: g0004
Revises: g0003
Create Date: 2026-12-07 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "g0004"
down_revision: str | Sequence[str] | None = "g0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("saf_entries") as batch:
        batch.add_column(sa.Column("origin", sa.String(8), nullable=True))
    op.execute(
        """
        UPDATE saf_entries SET origin = CASE
          WHEN kind = 'reversal' AND EXISTS (
            SELECT 1 FROM journal j
            WHERE j.idempotency_key = saf_entries.original_key AND j.response_code = '68'
          ) THEN 'gateway'
          WHEN kind = 'advice' AND EXISTS (
            SELECT 1 FROM journal j
            WHERE j.idempotency_key = saf_entries.idempotency_key AND j.mti = '0200'
          ) THEN 'gateway'
          ELSE 'acquirer' END
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("saf_entries") as batch:
        batch.drop_column("origin")
