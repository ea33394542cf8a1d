"""Failures from other channels: pushes the account made without stkpush, read from UpesiPay's transactions list.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new table: no existing rows to carry over.
    op.create_table(
        "external_failure",
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("provider_reference", AutoString(length=64), nullable=False),
        sa.Column("failed_at", UTCDateTime(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.Column("guard_told_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("account", "provider_reference"),
    )
    op.create_index("ix_external_failure_failed_at", "external_failure", ["failed_at"])


def downgrade() -> None:
    op.drop_table("external_failure")
