"""Collecting in order (issue 13): a score per batch row, and opt-in re-prompts per batch.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing batches get no re-prompts (nothing changes for them).
    with op.batch_alter_table("payment") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
    # Rows of batches already recorded: the score of a number without history (worker/scoring.py, NO_HISTORY), so
    # they keep their order among themselves (oldest first) and sort between payers and non-payers.
    op.execute("UPDATE payment SET score = 0.5 WHERE batch_id IS NOT NULL")
    op.create_index("ix_payment_batch_order", "payment", ["batch_id", "state", "score"])
    with op.batch_alter_table("batch") as batch:
        batch.add_column(sa.Column("reprompt_max", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("reprompt_after_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_index("ix_payment_batch_order", table_name="payment")
    with op.batch_alter_table("batch") as batch:
        batch.drop_column("reprompt_after_s")
        batch.drop_column("reprompt_max")
    with op.batch_alter_table("payment") as batch:
        batch.drop_column("score")
