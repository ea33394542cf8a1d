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
from sqlmodel import Session, col, select

from worker import bulk_order, runtime
from worker.dispatch import guard_refusal_reason, publish_payment
from worker.guard import RefusalReason
from worker.ledger import Batch, Payment, PaymentState, session_scope, transition, utcnow

# Batches older than this are not looked at for turns: a batch still sending after a month is served by its own
# messages (and a bound keeps the lookup short).
ACTIVE_BATCH_DAYS = 30
# At most this many batches are compared per turn (the oldest first, so an old batch is never starved).
BATCHES_COMPARED = 50
# Under BULK_ORDER=score, a message tries up to this many of its batch's best waiting rows before its own.
SCORE_CANDIDATES = 8
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
        order = bulk_order.current()
        if target == payment.batch_id and payment.state == PaymentState.PENDING and not order.by_score:
            return own
        # Another batch's turn, or this message's own row is gone (taken by another batch's turn), or the order is
        # by score: the batch's first waiting rows in the bulk order (worker/bulk_order.py) go out instead. Under
        # score, the next few too: workers racing for the best row must fall back on the next best, not on their
        # own message's row (which may be the batch's worst).
        first = session.exec(
            select(Payment.id)
            .where(col(Payment.batch_id) == target, col(Payment.state) == PaymentState.PENDING)
            .order_by(*order.pending())
            .limit(SCORE_CANDIDATES if order.by_score else 1)
        ).all()
        better = _better_waiting(session, target, first[0] if first else None) if order.by_score else None
    if better is not None and _swap_in(payment, better):
        return [better, *[row_id for row_id in first if row_id != payment.id]]
    best = [row_id for row_id in first if row_id != payment.id]
    if payment.id in first[:1]:
        return own + best
    return [*best, payment.id] if best else own


# Rows deferred only because the bulk lane or the budget was full: their due time is a retry hint, not a rule.
_LANE_WAITS = (RefusalReason.BULK_LANE_FULL, RefusalReason.ACCOUNT_BUDGET)


def _better_waiting(session: Session, batch_id: str, best_pending: str | None) -> str | None:
    """Under BULK_ORDER=score: the batch's best row deferred only for the lane or the budget, when it scores above
    its best PENDING row (a row refused while the lane was full must not lose its place to worse rows that merely
    kept their messages)."""
    reasons = [guard_refusal_reason(reason) for reason in _LANE_WAITS]
    row = session.exec(
        select(Payment.id, Payment.score)
        .where(col(Payment.batch_id) == batch_id, col(Payment.state) == PaymentState.DEFERRED)
        .where(col(Payment.reason).in_(reasons))
        .order_by(*bulk_order.current().waiting())
        .limit(1)
    ).first()
    if row is None:
        return None
    if best_pending is not None:
        pending_score = session.exec(select(Payment.score).where(col(Payment.id) == best_pending)).first()
        if pending_score is not None and (row[1] is None or row[1] <= pending_score):
            return None
    return str(row[0])


def _swap_in(payment: Payment, better: str) -> bool:
    """The better deferred row goes back to PENDING with a message of its own, and this message's own row, if still
    PENDING, waits in its place (PENDING -> DEFERRED, due at once, for the dispatcher). This message then tries the
    better row first; whoever claims it, no PENDING row is left without a message (a spare message finds nothing
    to claim, which is harmless). Each step is a conditional transition: a crash between them leaves a DEFERRED
    row (released by the dispatcher) or a PENDING row not yet queued (queued by `requeue_stale_pending`)."""
    engine = runtime.engine()
    reason = guard_refusal_reason(RefusalReason.BULK_LANE_FULL)
    transition(
        engine,
        payment.id,
        [PaymentState.PENDING],
        PaymentState.DEFERRED,
        reason=reason,
        next_attempt_at=utcnow(),
    )
    moved = transition(engine, better, [PaymentState.DEFERRED], PaymentState.PENDING, queued_at=None)
    if moved:
        publish_payment(better, queue="bulk")
    return moved
