"""Releases of numbers held at their streak limit (`stkpush guard release`), so a rebuilt guard keeps them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new table: no existing rows to carry over.
    op.create_table(
        "phone_release",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("phone", AutoString(length=12), nullable=False),
        sa.Column("released_at", UTCDateTime(), nullable=False),
        sa.Column("released_by", AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_phone_release_account", "phone_release", ["account"])


def downgrade() -> None:
    op.drop_table("phone_release")
