"""Batches share the bulk lane by turns (docs/guard.md, "Lanes"): a batch's messages all sit on the `bulk` queue from
ingestion on, so a 20-row batch queued after a 100k-row one would wait behind 100k messages. Instead, every bulk
message is one turn of the bulk lane: the worker that takes it sends the oldest waiting row of the batch with the
fewest sends in flight, which is the message's own row whenever its batch is among the fewest.

Each message still takes exactly one PENDING row out of waiting (its own, or another batch's whose own message
will then take another), so every row keeps a message; a row whose messages were all spent on others (two workers
racing for one row) is queued again by the dispatcher (`requeue_stale_pending`). The dispatcher's releases of
DEFERRED rows use the same rule (`worker.dispatch._bulk_turns`). The turns are shared across accounts as well:
a bulk message of one account's batch may send another account's row.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func
from sqlmodel import col, select

from worker import runtime
from worker.ledger import Batch, Payment, PaymentState, session_scope, utcnow

# Batches older than this are not looked at for turns: a batch still sending after a month is served by its own
# messages (and a bound keeps the lookup short).
ACTIVE_BATCH_DAYS = 30
# At most this many batches are compared per turn (the oldest first, so an old batch is never starved).
BATCHES_COMPARED = 50
# States whose sends are (or may be) in flight: a batch's share of the bulk lane is counted in these.
IN_FLIGHT_STATES = (PaymentState.SENDING, PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)


def candidates(payment: Payment) -> list[str]:
    """The ids of the bulk rows this message should try to send, best first: its own row while its batch is among
    those with the fewest sends in flight, else the oldest waiting row of the batch with the fewest; then its own."""
    own = [payment.id]
    if payment.batch_id is None:
        return own
    since = utcnow() - timedelta(days=ACTIVE_BATCH_DAYS)
    with session_scope(runtime.engine()) as session:
        batches = session.exec(
            select(Batch.id)
            # Every account's batches: the bulk queue is shared by the accounts too, so one merchant's 100k-row
            # batch can't hold the workers from another's. The row sent is checked against its own account's
            # guard and sent with its own token (worker.sending resolves both from the row).
            .where(col(Batch.created_at) >= since)
            .where(col(Batch.paused_at).is_(None))
            .order_by(col(Batch.created_at))
            .limit(BATCHES_COMPARED)
        ).all()
        waiting: list[tuple[int, int, str]] = []  # (in flight, age rank, batch): ties go to the older batch
        for rank, batch_id in enumerate(batches):
            has_pending = session.exec(
                select(Payment.id)
                .where(col(Payment.batch_id) == batch_id, col(Payment.state) == PaymentState.PENDING)
                .limit(1)
            ).first()
            if has_pending is None:
                continue
            in_flight = session.exec(
                select(func.count()).where(
                    col(Payment.batch_id) == batch_id, col(Payment.state).in_(IN_FLIGHT_STATES)
                )
            ).one()
            waiting.append((int(in_flight), rank, batch_id))
        mine = next((count for count, _, batch_id in waiting if batch_id == payment.batch_id), None)
        if not waiting:
            return own
        target = payment.batch_id if mine is not None and mine <= min(waiting)[0] else min(waiting)[2]
        if target == payment.batch_id and payment.state == PaymentState.PENDING:
            return own
        # Another batch's turn, or this message's own row is gone (taken by another batch's turn): the batch's
        # oldest waiting row goes out instead.
        oldest = session.exec(
            select(Payment.id)
            .where(col(Payment.batch_id) == target, col(Payment.state) == PaymentState.PENDING)
            .order_by(col(Payment.created_at))
            .limit(1)
        ).first()
    return [oldest, payment.id] if oldest is not None else own
