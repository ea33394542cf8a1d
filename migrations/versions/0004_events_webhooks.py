"""Events (the outbox) and webhooks: the event, webhook_endpoint, webhook_delivery and webhook_attempt tables of
worker/events.py and worker/webhooks/store.py. New tables only: existing payments and batches are untouched, and
payments settled before this revision simply have no events (`stkpush webhook replay` covers events, not them).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DELIVERY_STATES = ("PENDING", "DELIVERED", "GAVE_UP")


def upgrade() -> None:
    op.create_table(
        "event",
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("id", AutoString(length=28), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("type", AutoString(length=40), nullable=False),
        sa.Column("payment_id", AutoString(length=32), nullable=True),
        sa.Column("batch_id", AutoString(length=32), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("dedup_key", AutoString(length=80), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id"),
        sa.UniqueConstraint("dedup_key"),
    )
    for column in ("account", "payment_id", "created_at"):
        op.create_index(f"ix_event_{column}", "event", [column])

    op.create_table(
        "webhook_endpoint",
        sa.Column("id", AutoString(length=24), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("url", AutoString(length=2048), nullable=False),
        sa.Column("secret", AutoString(length=100), nullable=False),
        sa.Column("events", AutoString(length=500), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_reason", AutoString(length=255), nullable=True),
        sa.Column("failing_since", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_endpoint_account", "webhook_endpoint", ["account"])

    op.create_table(
        "webhook_delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_seq", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", AutoString(length=24), nullable=False),
        sa.Column("payment_id", AutoString(length=32), nullable=True),
        sa.Column("state", sa.Enum(*DELIVERY_STATES, name="deliverystate"), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=False),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.Column("lease_token", AutoString(length=32), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", AutoString(length=255), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("delivered_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_delivery_due", "webhook_delivery", ["state", "next_attempt_at"])
    op.create_index("ix_webhook_delivery_event_seq", "webhook_delivery", ["event_seq"])
    op.create_index("ix_webhook_delivery_endpoint_id", "webhook_delivery", ["endpoint_id"])

    op.create_table(
        "webhook_attempt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", AutoString(length=24), nullable=False),
        sa.Column("attempted_at", UTCDateTime(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", AutoString(length=255), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_attempt_delivery_id", "webhook_attempt", ["delivery_id"])
    op.create_index("ix_webhook_attempt_endpoint_id", "webhook_attempt", ["endpoint_id"])


def downgrade() -> None:
    for table in ("webhook_attempt", "webhook_delivery", "webhook_endpoint", "event"):
        op.drop_table(table)
    sa.Enum(name="deliverystate").drop(op.get_bind(), checkfirst=True)
