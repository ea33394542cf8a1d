"""`batch.finished`: once every payment of an ingested batch has ended, one event with the batch's totals.

Decided on beat's tick, not inside a payment's transition: under PostgreSQL's READ COMMITTED two transactions
settling a batch's last two payments each see the other's payment still in flight, and both would skip the
event. The tick sees committed rows only, so it cannot miss; the event's `dedup_key` (unique) makes a second
tick, or a second beat, write nothing. The event and its deliveries commit together, as for payments.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, exists, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from worker import runtime
from worker.events import CommittedEvent, Event, EventType, announce, hook_task, new_event_id
from worker.ledger import TERMINAL_STATES, Batch, BatchState, Payment, PaymentState
from worker.webhooks.store import fan_out

log = logging.getLogger("stkpush.events")

# Batches examined per tick: a tick stays short however many batches finish together.
TICK_LIMIT = 50


def dedup_key(batch_id: str) -> str:
    return f"{EventType.BATCH_FINISHED.value}:{batch_id}"


def emit_finished_batches(limit: int = TICK_LIMIT) -> int:
    """Write `batch.finished` for each ingested batch whose payments have all ended; returns how many."""
    in_flight = [state for state in PaymentState if state not in TERMINAL_STATES]
    prefix = literal(f"{EventType.BATCH_FINISHED.value}:", String)
    with runtime.engine().connect() as connection:
        batches = connection.execute(
            select(
                col(Batch.id),
                col(Batch.source_name),
                col(Batch.rows_recorded),
                col(Batch.amount_requested),
                col(Batch.account),
            )
            .where(
                col(Batch.state) == BatchState.INGESTED,
                ~exists().where(col(Payment.batch_id) == col(Batch.id), col(Payment.state).in_(in_flight)),
                ~exists().where(col(Event.dedup_key) == prefix.concat(col(Batch.id))),
            )
            .order_by(col(Batch.created_at))
            .limit(limit)
        ).all()
    # Every account's batches: each event carries its batch's account (its webhooks and `?wait=` are that
    # account's).
    committed = [event for batch in batches if (event := _write(batch, batch.account)) is not None]
    announce(committed)
    return len(committed)


def _write(batch: Any, account: str) -> CommittedEvent | None:
    now = datetime.now(UTC)
    event_id = new_event_id()
    try:
        with runtime.engine().begin() as connection:
            rows = connection.execute(
                select(col(Payment.state), func.count(), func.sum(col(Payment.amount)))
                .where(col(Payment.batch_id) == batch.id)
                .group_by(col(Payment.state))
            ).all()
            counts = {
                str(getattr(state, "value", state)): (int(n), int(total or 0)) for state, n, total in rows
            }
            body = {
                "id": event_id,
                "type": EventType.BATCH_FINISHED.value,
                "created": now.isoformat(),
                "account": account,
                "data": {
                    "batch": {
                        "id": batch.id,
                        "source_name": batch.source_name,
                        "rows_recorded": batch.rows_recorded,
                        "amount_requested": batch.amount_requested,
                        "amount_collected": counts.get("SUCCEEDED", (0, 0))[1],
                        "payments_by_state": {state: n for state, (n, _) in sorted(counts.items())},
                    }
                },
            }
            key = connection.execute(
                insert(Event).values(
                    id=event_id,
                    account=account,
                    type=EventType.BATCH_FINISHED.value,
                    batch_id=batch.id,
                    payload=json.dumps(body, separators=(",", ":"), sort_keys=True),
                    dedup_key=dedup_key(batch.id),
                    created_at=now,
                )
            ).inserted_primary_key
            assert key is not None
            seq = int(key[0])
            deliveries = fan_out(
                connection, seq, account, EventType.BATCH_FINISHED.value, None, now, hook_task()
            )
    except IntegrityError:
        return None  # another tick (or a second beat) wrote it first
    log.info("batch %s finished: event %s", batch.id, event_id)
    return CommittedEvent(
        seq, event_id, EventType.BATCH_FINISHED.value, account, None, None, tuple(deliveries)
    )
