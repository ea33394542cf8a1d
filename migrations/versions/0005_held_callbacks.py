"""Held callbacks: a callback that comes before UpesiPay's 201 is recorded waits on its payment row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A nullable column: existing rows carry over unchanged (none of them holds a callback).
    with op.batch_alter_table("payment") as batch:
        batch.add_column(sa.Column("held_callbacks", AutoString(length=4096), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("payment") as batch:
        batch.drop_column("held_callbacks")
