"""Store-and-forward queue.

Written by hand and frozen (it does not import the models). Constraint and index names
follow :data:`shared.store.db.NAMING_CONVENTION`.

Revision ID: g0002
Revises: g0001
Create Date: 2026-11-29 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "g0002"
down_revision: str | Sequence[str] | None = "g0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only auto-increments a column declared exactly "INTEGER PRIMARY KEY".
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TABLE = "saf_entries"


def upgrade() -> None:
    op.create_table(
        _TABLE,
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("original_key", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(10), nullable=False),
        sa.Column("mti", sa.String(4), nullable=False),
        sa.Column("terminal_id", sa.String(16), nullable=False),
        sa.Column("acquirer_id", sa.String(11), nullable=False),
        sa.Column("stan", sa.String(6), nullable=False),
        sa.Column("rrn", sa.String(12), nullable=True),
        sa.Column("bill_number", sa.String(32), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("pan_masked", sa.String(19), nullable=True),
        sa.Column("pan_hash", sa.String(64), nullable=True),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("response_code", sa.String(2), nullable=True),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.Column("late_response_code", sa.String(2), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_saf_entries"),
        sa.UniqueConstraint("idempotency_key", name="uq_saf_entries_idempotency_key"),
        sa.CheckConstraint(
            "state IN ('queued', 'in_flight', 'done', 'dead', 'cancelled')",
            name="ck_saf_entries_state",
        ),
        sa.CheckConstraint("kind IN ('advice', 'reversal')", name="ck_saf_entries_kind"),
    )
    op.create_index("ix_saf_entries_state", _TABLE, ["state", "priority", "id"])
    op.create_index("ix_saf_entries_terminal_id", _TABLE, ["terminal_id", "state"])
    op.create_index("ix_saf_entries_original_key", _TABLE, ["original_key"])
    op.create_index("ix_saf_entries_rrn", _TABLE, ["rrn"])
    op.create_index("ix_saf_entries_pan_hash", _TABLE, ["pan_hash"])


def downgrade() -> None:
    op.drop_index("ix_saf_entries_pan_hash", table_name=_TABLE)
    op.drop_index("ix_saf_entries_rrn", table_name=_TABLE)
    op.drop_index("ix_saf_entries_original_key", table_name=_TABLE)
    op.drop_index("ix_saf_entries_terminal_id", table_name=_TABLE)
    op.drop_index("ix_saf_entries_state", table_name=_TABLE)
    op.drop_table(_TABLE)
