"""The outbox: an `event` row for every payment change a merchant cares about, written in the same database
transaction as the change (worker.ledger.transition calls `record_for_transition` inside its `engine.begin()`).

So an event exists exactly when its change committed: a process that dies after the commit loses nothing (the
deliveries wait in the ledger too, see worker.webhooks.store), and a transition that did not move the row writes
nothing. Listeners registered with `on_committed` hear about events after the commit (to queue deliveries at
once and wake `?wait=` requests); they are a shortcut only, beat's release finds every due delivery anyway.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Column, Connection, Text, insert
from sqlmodel import Field, SQLModel

from worker.phones import mask_phone
from worker.settings import SettingsError, get_settings
from worker.webhooks.store import fan_out

log = logging.getLogger("stkpush.events")


class EventType(StrEnum):
    PAYMENT_SUCCEEDED = "payment.succeeded"
    PAYMENT_FAILED = "payment.failed"
    PAYMENT_CANCELLED = "payment.cancelled"  # the customer declined the prompt (M-Pesa 1032)
    PAYMENT_REJECTED = "payment.rejected"  # UpesiPay refused the request; the customer was never prompted
    PAYMENT_EXPIRED = (
        "payment.expired"  # no answer in time (1037, 1019) or no outcome learned (assumed failure)
    )
    # A success that arrived after we had assumed a failure: the earlier payment.expired was wrong.
    PAYMENT_SUCCEEDED_AFTER_FAILURE = "payment.succeeded_after_failure"
    # Every payment of an ingested batch has ended (worker.batch_events, on beat's tick).
    BATCH_FINISHED = "batch.finished"


# M-Pesa result codes meaning the prompt went unanswered or ran out (upesipay-api.md).
EXPIRED_RESULT_CODES = frozenset({1037, 1019})
# The reason prefix worker.settlement gives a failure it assumed (kept here: the ledger layer may not import it).
ASSUMED_FAILURE = "unsettled:"


def new_event_id() -> str:
    return "evt_" + secrets.token_hex(12)


class Event(SQLModel, table=True):
    """One thing that happened to a payment, as the merchant is told it. `seq` orders events; `id` is public."""

    __tablename__ = "event"

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(default_factory=new_event_id, max_length=28, unique=True)
    account: str = Field(max_length=64, index=True)
    type: str = Field(max_length=40)
    payment_id: str | None = Field(default=None, max_length=32, index=True)
    batch_id: str | None = Field(default=None, max_length=32)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # the exact JSON body a webhook receives
    # For events that must happen once per subject (batch.finished:<batch id>): a second insert fails.
    dedup_key: str | None = Field(default=None, max_length=80, unique=True)
    created_at: datetime = Field(index=True)


@dataclass(frozen=True)
class CommittedEvent:
    """What listeners hear after the commit: ids and the public reference only."""

    seq: int
    id: str
    type: str
    account: str
    payment_id: str | None
    external_reference: str | None
    delivery_ids: tuple[int, ...]


_listeners: list[Callable[[CommittedEvent], None]] = []


def on_committed(listener: Callable[[CommittedEvent], None]) -> None:
    if listener not in _listeners:
        _listeners.append(listener)


def announce(committed: Iterable[CommittedEvent]) -> None:
    for event in committed:
        for listener in list(_listeners):
            try:
                listener(event)
            except Exception as error:  # the change is committed; a listener is only a shortcut
                log.warning("event %s: listener failed (%s)", event.id, type(error).__name__)


def event_type_for(
    from_states: frozenset[str], to_state: str, result_code: int | None, reason: str | None
) -> EventType | None:
    """The event a transition into `to_state` makes, or None when the merchant need not hear of it."""
    if to_state == "SUCCEEDED":
        # Only worker.settlement.take_back_assumed_failure moves FAILED -> SUCCEEDED.
        if from_states == {"FAILED"}:
            return EventType.PAYMENT_SUCCEEDED_AFTER_FAILURE
        return EventType.PAYMENT_SUCCEEDED
    if to_state == "CANCELLED":
        return EventType.PAYMENT_CANCELLED
    if to_state == "REJECTED":
        return EventType.PAYMENT_REJECTED
    if to_state == "EXPIRED":
        # Never sent: its deadline passed while it waited (issue 12's lanes and deadlines).
        return EventType.PAYMENT_EXPIRED
    if to_state == "FAILED":
        if result_code in EXPIRED_RESULT_CODES or (reason or "").startswith(ASSUMED_FAILURE):
            return EventType.PAYMENT_EXPIRED
        return EventType.PAYMENT_FAILED
    return None


def payment_fields(row: Any) -> dict[str, Any]:
    """The public fields of a payment row: no name, the phone masked, no provider text."""
    settled = row.settled_at
    return {
        "id": row.id,
        "external_reference": row.external_reference,
        "amount": row.amount,
        "state": str(getattr(row.state, "value", row.state)),
        "receipt": row.receipt,
        "result_code": row.result_code,
        "phone": mask_phone(row.phone),
        "batch_id": row.batch_id,
        "settled_at": settled.isoformat() if isinstance(settled, datetime) else settled,
    }


def hook_task() -> str:
    try:
        return get_settings().stkpush_on_outcome_task
    except SettingsError:  # a bare ledger (unit tests, a one-off script) has no settings: no hook to feed
        return ""


def record_for_transition(
    connection: Connection, payment_row: Any, from_states: frozenset[str]
) -> CommittedEvent | None:
    """Inside the transition's transaction: write the event for the row as it now stands, and its deliveries."""
    state = str(getattr(payment_row.state, "value", payment_row.state))
    event_type = event_type_for(from_states, state, payment_row.result_code, payment_row.reason)
    if event_type is None:
        return None
    now = datetime.now(UTC)
    event_id = new_event_id()
    body = {
        "id": event_id,
        "type": event_type.value,
        "created": now.isoformat(),
        "account": payment_row.account,
        "data": {"payment": payment_fields(payment_row)},
    }
    payload = json.dumps(body, separators=(",", ":"), sort_keys=True)
    key = connection.execute(
        insert(Event).values(
            id=event_id,
            account=payment_row.account,
            type=event_type.value,
            payment_id=payment_row.id,
            batch_id=payment_row.batch_id,
            payload=payload,
            created_at=now,
        )
    ).inserted_primary_key
    assert key is not None
    seq = key[0]
    deliveries = fan_out(
        connection, int(seq), payment_row.account, event_type.value, payment_row.id, now, hook_task()
    )
    return CommittedEvent(
        seq=int(seq),
        id=event_id,
        type=event_type.value,
        account=payment_row.account,
        payment_id=payment_row.id,
        external_reference=payment_row.external_reference,
        delivery_ids=tuple(deliveries),
    )
