"""The webhook tables: endpoints (per account, each with its own signing secret), deliveries (one per event and
target, waiting in the ledger with `next_attempt_at`) and the attempt log.

`fan_out` runs inside the transition's transaction (via worker.events), so a committed event always has its
deliveries: nothing sits between the commit and the outbox for a crash to lose.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Connection, Index, insert, select
from sqlmodel import Field, SQLModel, col

# The target of the Python hook's deliveries (STKPUSH_ON_OUTCOME_TASK); never an endpoint id (those are `we_...`).
HOOK_TARGET = "python-hook"
ALL_EVENTS = "*"


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(8)


def new_signing_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


class DeliveryState(StrEnum):
    PENDING = "PENDING"  # waiting for next_attempt_at (or leased by a worker until lease_until)
    DELIVERED = "DELIVERED"  # the receiver answered 2xx (or the hook's message is on the broker)
    GAVE_UP = "GAVE_UP"  # still failing after WEBHOOK_RETRY_FOR_S; `stkpush webhook replay` sends it again


class WebhookEndpoint(SQLModel, table=True):
    __tablename__ = "webhook_endpoint"

    id: str = Field(default_factory=new_endpoint_id, primary_key=True, max_length=24)
    account: str = Field(max_length=64, index=True)
    url: str = Field(max_length=2048)
    # Kept so deliveries can be signed; shown once at creation, never logged or listed.
    secret: str = Field(max_length=100)
    events: str = Field(default=ALL_EVENTS, max_length=500)  # comma-separated event types, or "*"
    enabled: bool = True
    disabled_reason: str | None = Field(default=None, max_length=255)
    failing_since: datetime | None = None  # the first failure of the current run of failures
    created_at: datetime


class WebhookDelivery(SQLModel, table=True):
    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "state", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    event_seq: int = Field(index=True)
    endpoint_id: str = Field(max_length=24, index=True)  # or HOOK_TARGET
    payment_id: str | None = Field(default=None, max_length=32)  # deliveries of one payment go in event order
    state: DeliveryState = Field(default=DeliveryState.PENDING, max_length=12)
    attempts: int = 0
    next_attempt_at: datetime
    lease_until: datetime | None = None
    lease_token: str | None = Field(default=None, max_length=32)
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=255)
    created_at: datetime
    delivered_at: datetime | None = None


class WebhookAttempt(SQLModel, table=True):
    """The delivery log: one row per POST (or hook publish), with what the receiver answered."""

    __tablename__ = "webhook_attempt"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: int = Field(index=True)
    endpoint_id: str = Field(max_length=24, index=True)
    attempted_at: datetime
    status_code: int | None = None
    error: str | None = Field(default=None, max_length=255)
    duration_ms: int = 0


def subscribed(events: str, event_type: str) -> bool:
    wanted = {item.strip() for item in events.split(",") if item.strip()}
    return ALL_EVENTS in wanted or event_type in wanted


def fan_out(
    connection: Connection,
    event_seq: int,
    account: str,
    event_type: str,
    payment_id: str | None,
    now: datetime,
    hook_task: str,
) -> list[int]:
    """One delivery per enabled endpoint of the account subscribed to `event_type`, and one for the hook."""
    endpoints = connection.execute(
        select(col(WebhookEndpoint.id), col(WebhookEndpoint.events)).where(
            col(WebhookEndpoint.account) == account, col(WebhookEndpoint.enabled).is_(True)
        )
    ).all()
    targets = [endpoint_id for endpoint_id, events in endpoints if subscribed(events, event_type)]
    if hook_task:
        targets.append(HOOK_TARGET)
    ids: list[int] = []
    for target in targets:
        result = connection.execute(
            insert(WebhookDelivery).values(
                event_seq=event_seq,
                endpoint_id=target,
                payment_id=payment_id,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        ids.append(int(key[0]))
    return ids
