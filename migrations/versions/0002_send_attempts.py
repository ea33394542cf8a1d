"""Send attempts and recorded provider blocks: the ledger becomes the guard's truth (issue 10).

Adds `send_attempt` (one row per push attempt; its id is the guard token) and `guard_block` (restrictions and
blocks the provider announced). The data migration gives every payment that was claimed or sent one attempt: its
guard token (or `<payment id>.m1` when it had none), its send time, and, for ended payments, the outcome the guard
was told (taken as told: the code before this revision resolved in the same call). The payment's guard_token then
names that attempt, so callbacks to the old URL shape reach it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ATTEMPT_OUTCOMES = ("SUCCESS", "FAILURE", "RELEASED", "REFUSED", "REVERTED")
BLOCK_KINDS = ("ACCOUNT", "PHONE")
IN_FLIGHT = ("SENDING", "AWAITING_CALLBACK", "UNKNOWN")
PAYMENT_STATES = ("PENDING", "DEFERRED", *IN_FLIGHT, "SUCCEEDED", "FAILED", "CANCELLED", "REJECTED")


def upgrade() -> None:
    op.create_table(
        "send_attempt",
        sa.Column("id", AutoString(length=64), nullable=False),
        sa.Column("payment_id", AutoString(length=32), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("lane", AutoString(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("sent_at", UTCDateTime(), nullable=True),
        sa.Column("provider_reference", AutoString(length=64), nullable=True),
        sa.Column("checkout_request_id", AutoString(length=100), nullable=True),
        sa.Column("outcome", sa.Enum(*ATTEMPT_OUTCOMES, name="attemptoutcome"), nullable=True),
        sa.Column("outcome_at", UTCDateTime(), nullable=True),
        sa.Column("guard_resolved_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(["payment_id"], ["payment.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("payment_id", "account", "outcome", "outcome_at", "guard_resolved_at"):
        op.create_index(f"ix_send_attempt_{column}", "send_attempt", [column])
    op.create_table(
        "guard_block",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account", AutoString(length=64), nullable=False),
        sa.Column("kind", sa.Enum(*BLOCK_KINDS, name="guardblockkind"), nullable=False),
        sa.Column("phone", AutoString(length=12), nullable=True),
        sa.Column("until", UTCDateTime(), nullable=False),
        sa.Column("reason", AutoString(length=120), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_guard_block_account", "guard_block", ["account"])
    op.create_index("ix_guard_block_until", "guard_block", ["until"])
    _carry_over_payments()


def _carry_over_payments() -> None:
    payment = sa.table(
        "payment",
        sa.column("id", sa.String),
        sa.column("account", sa.String),
        sa.column("queue", sa.String),
        # The types the columns have (PostgreSQL compares an enum column only with its own type).
        sa.column("state", sa.Enum(*PAYMENT_STATES, name="paymentstate", create_type=False)),
        sa.column("guard_token", sa.String),
        sa.column("provider_reference", sa.String),
        sa.column("checkout_request_id", sa.String),
        sa.column("created_at", UTCDateTime()),
        sa.column("updated_at", UTCDateTime()),
        sa.column("sent_at", UTCDateTime()),
        sa.column("settled_at", UTCDateTime()),
    )
    attempt = sa.table(
        "send_attempt",
        *(
            sa.column(name, sa.String)
            for name in ("id", "payment_id", "account", "lane", "provider_reference", "checkout_request_id")
        ),
        sa.column("number", sa.Integer),
        sa.column("outcome", sa.Enum(*ATTEMPT_OUTCOMES, name="attemptoutcome", create_type=False)),
        *(
            sa.column(name, UTCDateTime())
            for name in ("created_at", "sent_at", "outcome_at", "guard_resolved_at")
        ),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(payment).where(
            sa.or_(payment.c.guard_token.is_not(None), payment.c.sent_at.is_not(None))
            | payment.c.state.in_(IN_FLIGHT)
        )
    ).all()
    for row in rows:
        state = row.state
        if state in ("PENDING", "DEFERRED"):
            # Not out now: an earlier attempt (if any) ended with nothing owed.
            continue
        token = row.guard_token or f"{row.id}.m1"
        if state == "SUCCEEDED":
            outcome: str | None = "SUCCESS"
        elif state in ("CANCELLED", "REJECTED") or (state == "FAILED" and row.sent_at is not None):
            outcome = "FAILURE"
        elif state == "FAILED":
            outcome = "RELEASED"  # never reached UpesiPay (connection failures until the last attempt)
        else:
            outcome = None  # still in flight: the guard holds (or should hold) its reservation
        ended_at = row.settled_at or row.updated_at if outcome is not None else None
        bind.execute(
            attempt.insert().values(
                id=token,
                payment_id=row.id,
                account=row.account,
                number=1,
                lane=row.queue or "single",
                created_at=row.sent_at or row.updated_at or row.created_at,
                sent_at=row.sent_at,
                provider_reference=row.provider_reference,
                checkout_request_id=row.checkout_request_id,
                outcome=outcome,
                outcome_at=ended_at,
                guard_resolved_at=ended_at,
            )
        )
        if row.guard_token is None:
            bind.execute(payment.update().where(payment.c.id == row.id).values(guard_token=token))


def downgrade() -> None:
    op.drop_table("guard_block")
    op.drop_table("send_attempt")
    # PostgreSQL keeps enum types apart from the tables that used them.
    sa.Enum(name="attemptoutcome").drop(op.get_bind(), checkfirst=True)
    sa.Enum(name="guardblockkind").drop(op.get_bind(), checkfirst=True)
