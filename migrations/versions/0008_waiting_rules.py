"""Re-openings of payments never sent (`stkpush retry`), the lookups that may license resending an ambiguous send,
and which send attempts never reached UpesiPay (issue 11).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing attempts are not marked: a payment mid-outage at upgrade time gets its budget from its next attempt.
    with op.batch_alter_table("send_attempt") as batch:
        batch.add_column(sa.Column("not_sent", sa.Boolean(), nullable=False, server_default=sa.false()))
    # New tables: no existing rows to carry over.
    op.create_table(
        "payment_reopen",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("payment_id", AutoString(length=32), nullable=False),
        sa.Column("reopened_at", UTCDateTime(), nullable=False),
        sa.Column("reopened_by", AutoString(length=64), nullable=False),
        sa.Column("previous_reason", AutoString(length=500), nullable=True),
        sa.ForeignKeyConstraint(["payment_id"], ["payment.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_payment_reopen_payment_id", "payment_reopen", ["payment_id"])
    op.create_table(
        "unknown_lookup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("attempt_id", AutoString(length=64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("source", AutoString(length=16), nullable=False),
        sa.Column("answer", AutoString(length=16), nullable=False),
        sa.Column("asked_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["attempt_id"], ["send_attempt.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("attempt_id", "slot", name="uq_unknown_lookup_attempt_slot"),
    )
    op.create_index("ix_unknown_lookup_attempt_id", "unknown_lookup", ["attempt_id"])


def downgrade() -> None:
    op.drop_table("unknown_lookup")
    op.drop_table("payment_reopen")
    with op.batch_alter_table("send_attempt") as batch:
        batch.drop_column("not_sent")
