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

from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from worker import bulk_order, runtime
from worker.dispatch import guard_refusal_reason
from worker.guard import RefusalReason
from worker.ledger import Batch, Payment, PaymentState, session_scope, transition, utcnow
from worker.scoring import NO_HISTORY

# Batches older than this are not looked at for turns: a batch still sending after a month is served by its own
# messages (and a bound keeps the lookup short).
ACTIVE_BATCH_DAYS = 30
# At most this many batches are compared per turn (the oldest first, so an old batch is never starved).
BATCHES_COMPARED = 50
# Under BULK_ORDER=score, a message looks at up to this many of its batch's best waiting rows (racing workers take
# the next best).
SCORE_CANDIDATES = 8
# States whose sends are (or may be) in flight: a batch's share of the bulk lane is counted in these.
IN_FLIGHT_STATES = (PaymentState.SENDING, PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)


def candidates(payment: Payment) -> list[str]:
    """The ids of the bulk rows this message should try to send, best first. The batch whose turn it is: the
    message's own while its batch is among those with the fewest sends in flight, else the batch with the fewest.
    Under `fifo`: its own row, or that batch's oldest PENDING row (then its own). Under `score`: that batch's best
    waiting row, PENDING or DEFERRED (`_take_best`)."""
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
        order = bulk_order.current()
        # Under score a batch's DEFERRED rows the dispatcher may release wait for a turn too (`_best_waiting`).
        due = (col(Payment.state) == PaymentState.DEFERRED) & (col(Payment.next_attempt_at) <= utcnow())
        takeable = col(Payment.state) == PaymentState.PENDING
        if order.by_score:
            takeable = takeable | order.releasable(due)
        for rank, batch_id in enumerate(batches):
            has_pending = session.exec(
                select(Payment.id).where(col(Payment.batch_id) == batch_id, takeable).limit(1)
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
        if order.by_score:
            best = _best_waiting(session, target)
        else:
            if target == payment.batch_id and payment.state == PaymentState.PENDING:
                return own
            # Another batch's turn, or this message's own row is gone (taken by another batch's turn): that
            # batch's oldest PENDING row goes out instead.
            first = session.exec(
                select(Payment.id)
                .where(col(Payment.batch_id) == target, col(Payment.state) == PaymentState.PENDING)
                .order_by(*order.pending())
                .limit(1)
            ).all()
            others = [row_id for row_id in first if row_id != payment.id]
            return [*others, payment.id] if others else own
    return _take_best(payment, best)


def _best_waiting(session: Session, batch_id: str) -> list[tuple[str, PaymentState]]:
    """Under BULK_ORDER=score: the batch's best waiting rows, PENDING or DEFERRED-and-releasable alike (due, or
    waiting only for the bulk lane or the budget: worker.bulk_order.releasable), in the bulk order. One query per
    state, each walking ix_payment_batch_order (batch_id, state, score) from the best score down, then merged."""
    order = bulk_order.current()
    due = (col(Payment.state) == PaymentState.DEFERRED) & (col(Payment.next_attempt_at) <= utcnow())
    merged: list[tuple[float, datetime, str, PaymentState]] = []
    for state, condition in (
        (PaymentState.PENDING, col(Payment.state) == PaymentState.PENDING),
        (PaymentState.DEFERRED, (col(Payment.state) == PaymentState.DEFERRED) & order.releasable(due)),
    ):
        rows = session.exec(
            select(Payment.id, Payment.score, Payment.created_at)
            .where(col(Payment.batch_id) == batch_id, condition)
            .order_by(*order.waiting())
            .limit(SCORE_CANDIDATES)
        ).all()
        # Batch rows all have a score (ingestion sets it, the migration gave older rows NO_HISTORY's).
        merged += [
            (-(NO_HISTORY if score is None else score), created, str(row_id), state)
            for row_id, score, created in rows
        ]
    merged.sort(key=lambda row: (row[0], row[1]))
    return [(row_id, state) for _, _, row_id, state in merged[:SCORE_CANDIDATES]]


def _take_best(payment: Payment, best: list[tuple[str, PaymentState]]) -> list[str]:
    """Under BULK_ORDER=score a bulk message sends the best waiting row of its turn's batch, whether that row is
    PENDING or waits DEFERRED (refused while the lane or the budget was full, or due): rows refused for the lane
    must not lose their place to worse rows that merely kept their messages, and workers racing for one row must
    not fall back on worse ones (the loser asks again: worker.sending's turn rounds).

    A DEFERRED row is taken by one conditional DEFERRED -> PENDING transition (whoever moves it, or claims it
    once moved, sends it: either way the best row goes out). When the row taken is not the message's own, its own
    row, if still PENDING, waits DEFERRED in the pool (due at once): it lost its message, and the dispatcher or
    the next bulk message sends it in its turn. Each step is one conditional transition; a crash between them
    leaves a PENDING row the next bulk message takes (or `requeue_stale_pending` queues) or a DEFERRED row the
    dispatcher releases."""
    engine = runtime.engine()
    for row_id, state in best:
        if state == PaymentState.DEFERRED and not transition(
            engine, row_id, [PaymentState.DEFERRED], PaymentState.PENDING, queued_at=utcnow()
        ):
            continue  # taken by another worker meanwhile: the next best
        if row_id != payment.id:
            transition(
                engine,
                payment.id,
                [PaymentState.PENDING],
                PaymentState.DEFERRED,
                reason=guard_refusal_reason(RefusalReason.BULK_LANE_FULL),
                next_attempt_at=utcnow(),
            )
        return [row_id]
    return [payment.id]
