"""Accounts as data: the `account` table (several UpesiPay accounts in one deployment, worker/accounts.py).

The environment's account is not stored, so existing payments, batches and guard rows (which already carry
their account's name) need no change.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new table: no existing rows to carry over.
    op.create_table(
        "account",
        sa.Column("name", AutoString(length=64), nullable=False),
        sa.Column("channel_ids", AutoString(length=255), nullable=False),
        sa.Column("token_ciphertext", AutoString(length=2048), nullable=False),
        sa.Column("phone_streak_limit", sa.Integer(), nullable=True),
        sa.Column("account_failure_limit", sa.Integer(), nullable=True),
        sa.Column("interactive_reserve", sa.Integer(), nullable=True),
        sa.Column("bulk_max_inflight", sa.Integer(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("token_updated_at", UTCDateTime(), nullable=False),
        sa.Column("api_key_hash", AutoString(length=64), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_index("ix_account_api_key_hash", "account", ["api_key_hash"], unique=True)


def downgrade() -> None:
    op.drop_table("account")
