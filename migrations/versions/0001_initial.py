"""Initial schema: the payment and batch tables of worker/ledger.py.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PAYMENT_STATES = (
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
BATCH_STATES = ("INGESTING", "INGESTED", "ABORTED", "FAILED")


def upgrade() -> None:
    op.create_table(
        "batch",
        sa.Column("id", AutoString(length=32), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("source_name", AutoString(length=255), nullable=False),
        sa.Column("state", sa.Enum(*BATCH_STATES, name="batchstate"), nullable=False),
        sa.Column("all_or_nothing", sa.Boolean(), nullable=False),
        sa.Column("rows_total", sa.Integer(), nullable=False),
        sa.Column("rows_recorded", sa.Integer(), nullable=False),
        sa.Column("rows_rejected", sa.Integer(), nullable=False),
        sa.Column("rows_skipped", sa.Integer(), nullable=False),
        sa.Column("rows_conflicting", sa.Integer(), nullable=False),
        sa.Column("amount_requested", sa.Integer(), nullable=False),
        sa.Column("error", AutoString(length=500), nullable=True),
        sa.Column("rejects_path", AutoString(length=1024), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batch_account", "batch", ["account"])
    op.create_index("ix_batch_created_at", "batch", ["created_at"])

    op.create_table(
        "payment",
        sa.Column("id", AutoString(length=32), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("external_reference", AutoString(length=64), nullable=False),
        sa.Column("phone", AutoString(length=12), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("customer_name", AutoString(length=100), nullable=True),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("queue", AutoString(length=16), nullable=False),
        sa.Column("batch_id", AutoString(length=32), nullable=True),
        sa.Column("state", sa.Enum(*PAYMENT_STATES, name="paymentstate"), nullable=False),
        sa.Column("reason", AutoString(length=500), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(), nullable=True),
        sa.Column("guard_token", AutoString(length=64), nullable=True),
        sa.Column("provider_reference", AutoString(length=64), nullable=True),
        sa.Column("checkout_request_id", AutoString(length=100), nullable=True),
        sa.Column("receipt", AutoString(length=64), nullable=True),
        sa.Column("result_code", sa.Integer(), nullable=True),
        sa.Column("result_desc", AutoString(length=255), nullable=True),
        sa.Column("provider_status_code", sa.Integer(), nullable=True),
        sa.Column("provider_response", AutoString(length=2048), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=True),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("settled_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("account", "external_reference", name="uq_payment_account_reference"),
    )
    for column in (
        "account",
        "batch_id",
        "created_at",
        "next_attempt_at",
        "phone",
        "provider_reference",
        "state",
    ):
        op.create_index(f"ix_payment_{column}", "payment", [column])


def downgrade() -> None:
    op.drop_table("payment")
    op.drop_table("batch")
    # PostgreSQL keeps enum types apart from the tables that used them.
    sa.Enum(name="paymentstate").drop(op.get_bind(), checkfirst=True)
    sa.Enum(name="batchstate").drop(op.get_bind(), checkfirst=True)
