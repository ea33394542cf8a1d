"""Lanes, deadlines and batch pauses (issue 12): payment.expires_at, the EXPIRED state, an index of a batch's rows
by state, batch.paused_at / pause_reason / resumed_at. Existing rows keep every value; they get no deadline and
no pause.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATES_BEFORE = (
    "PENDING",
    "DEFERRED",
    "SENDING",
    "AWAITING_CALLBACK",
    "UNKNOWN",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "REJECTED",
)


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if _postgresql():
        # PostgreSQL keeps the states in a native enum type; SQLite stores them as text with no constraint.
        op.execute("ALTER TYPE paymentstate ADD VALUE IF NOT EXISTS 'EXPIRED'")
    op.add_column("payment", sa.Column("expires_at", UTCDateTime(), nullable=True))
    op.add_column("batch", sa.Column("paused_at", UTCDateTime(), nullable=True))
    op.add_column("batch", sa.Column("pause_reason", AutoString(length=500), nullable=True))
    op.add_column("batch", sa.Column("resumed_at", UTCDateTime(), nullable=True))
    op.create_index("ix_payment_batch_state", "payment", ["batch_id", "state"])


def downgrade() -> None:
    # The older release knows no EXPIRED: those payments were never sent and will not be, so FAILED says the
    # same to it (the reason column still says why).
    op.execute("UPDATE payment SET state = 'FAILED' WHERE state = 'EXPIRED'")
    op.drop_index("ix_payment_batch_state", table_name="payment")
    with op.batch_alter_table("batch") as batch:
        batch.drop_column("resumed_at")
        batch.drop_column("pause_reason")
        batch.drop_column("paused_at")
    with op.batch_alter_table("payment") as payment:
        payment.drop_column("expires_at")
    if _postgresql():
        # An enum value cannot be dropped: rebuild the type without it.
        op.execute("ALTER TYPE paymentstate RENAME TO paymentstate_with_expired")
        sa.Enum(*STATES_BEFORE, name="paymentstate").create(op.get_bind())
        op.execute("ALTER TABLE payment ALTER COLUMN state TYPE paymentstate USING state::text::paymentstate")
        op.execute("DROP TYPE paymentstate_with_expired")
