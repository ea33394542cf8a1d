"""The dispatcher (run by beat): release due DEFERRED payments within the guard's headroom, re-queue PENDING
payments whose message was never sent or was lost, and recover SENDING rows whose worker died."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import case
from sqlmodel import col, select

from worker import runtime
from worker.guard import RefusalReason
from worker.ledger import Payment, PaymentState, mark, session_scope, transition, utcnow

log = logging.getLogger("stkpush.dispatch")

STK_PUSH_TASK = "stkpush.stk_push"
# Publishing retries briefly: a caller must learn within a second or two that Redis is away, not hang.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
# Upper bound on rows one tick touches, so a tick stays short whatever the backlog.
TICK_LIMIT = 500


def publish_payment(payment_id: str, *, queue: str | None = None, countdown_s: float | None = None) -> bool:
    """Put stk_push(payment_id) on the broker and note when; False (logged) when the broker can't take it."""
    from worker.celery_app import app

    if queue is None:
        with session_scope(runtime.engine()) as session:
            row = session.get(Payment, payment_id)
            queue = row.queue if row is not None else "single"
    if countdown_s is not None:
        assert countdown_s <= runtime.settings().visibility_timeout_s / 2, (
            "countdown beyond visibility_timeout/2"
        )
    try:
        app.send_task(
            STK_PUSH_TASK,
            args=[payment_id],
            queue=queue,
            countdown=countdown_s,
            retry=True,
            retry_policy=PUBLISH_RETRY_POLICY,
        )
    except Exception as error:  # kombu wraps broker failures in several types; all mean "not queued"
        log.warning("payment %s not queued: broker unavailable (%s)", payment_id, type(error).__name__)
        return False
    mark(runtime.engine(), payment_id, queued_at=utcnow())
    return True


def _single_first() -> object:
    return case((col(Payment.queue) == "single", 0), else_=1)


def release_deferred() -> int:
    """Release due DEFERRED payments, oldest first, single payments before batch rows, within the headroom."""
    headroom = runtime.guard().account_snapshot().headroom
    if headroom <= 0:
        return 0
    now = utcnow()
    with session_scope(runtime.engine()) as session:
        rows = session.exec(
            select(Payment.id, Payment.queue)
            .where(Payment.state == PaymentState.DEFERRED, col(Payment.next_attempt_at) <= now)
            .order_by(_single_first(), col(Payment.next_attempt_at), col(Payment.created_at))  # type: ignore[arg-type]
            .limit(min(headroom, TICK_LIMIT))
        ).all()
    released = sum(_release(payment_id, queue) for payment_id, queue in rows)
    if released:
        log.info("released %d deferred payments (headroom %d)", released, headroom)
    return released


def release_freed(phone: str) -> bool:
    """A resolve just freed a reservation: release, without waiting for beat's next tick, the one payment it
    most likely unblocks: the oldest waiting only for this number to be free, else (while the account has
    headroom) the oldest waiting for the account budget. Single payments go before batch rows."""
    waiting_for_phone = (col(Payment.phone) == phone) & (
        col(Payment.reason) == guard_refusal_reason(RefusalReason.PHONE_BUSY)
    )
    if _release_oldest(waiting_for_phone):
        return True
    if runtime.guard().account_snapshot().headroom <= 0:
        return False
    return _release_oldest(col(Payment.reason) == guard_refusal_reason(RefusalReason.ACCOUNT_BUDGET))


def _release_oldest(condition: Any) -> bool:
    with session_scope(runtime.engine()) as session:
        row = session.exec(
            select(Payment.id, Payment.queue)
            .where(Payment.state == PaymentState.DEFERRED)
            .where(condition)
            .order_by(_single_first(), col(Payment.created_at))  # type: ignore[arg-type]
            .limit(1)
        ).first()
    return row is not None and _release(*row)


def _release(payment_id: str, queue: str) -> bool:
    """DEFERRED -> PENDING, then queue it; False if another release got there first or the broker is away."""
    moved = transition(
        runtime.engine(), payment_id, [PaymentState.DEFERRED], PaymentState.PENDING, queued_at=None
    )
    return moved and publish_payment(payment_id, queue=queue)


def guard_refusal_reason(reason: RefusalReason) -> str:
    return f"guard: {reason.value}"


def requeue_stale_pending() -> int:
    """Queue PENDING rows that were never queued, or whose message has been gone too long to be waiting."""
    settings = runtime.settings()
    now = utcnow()
    never_queued_before = now - timedelta(seconds=10)
    lost_before = now - timedelta(seconds=settings.requeue_after_s)
    with session_scope(runtime.engine()) as session:
        rows = session.exec(
            select(Payment.id, Payment.queue)
            .where(Payment.state == PaymentState.PENDING)
            .where(
                (col(Payment.queued_at).is_(None) & (col(Payment.updated_at) <= never_queued_before))
                | (col(Payment.queued_at) <= lost_before)
            )
            .order_by(_single_first(), col(Payment.created_at))  # type: ignore[arg-type]
            .limit(TICK_LIMIT)
        ).all()
    # A duplicate message is harmless: the task's claim is conditional, so only one delivery sends.
    queued = sum(publish_payment(payment_id, queue=queue) for payment_id, queue in rows)
    if queued:
        log.info("re-queued %d pending payments", queued)
    return queued


def recover_stuck_sending() -> int:
    """A SENDING row past the task time limit belongs to a dead worker. It may or may not have sent, so it
    becomes UNKNOWN and settlement finds out; it is never simply sent again."""
    settings = runtime.settings()
    before = utcnow() - timedelta(seconds=settings.stuck_sending_after_s)
    with session_scope(runtime.engine()) as session:
        ids = session.exec(
            select(Payment.id)
            .where(Payment.state == PaymentState.SENDING, col(Payment.updated_at) <= before)
            .limit(TICK_LIMIT)
        ).all()
    recovered = 0
    for payment_id in ids:
        recovered += transition(
            runtime.engine(),
            payment_id,
            [PaymentState.SENDING],
            PaymentState.UNKNOWN,
            reason="worker stopped mid-send: outcome unknown, settling",
        )
    if recovered:
        log.warning("recovered %d payments from dead workers into UNKNOWN", recovered)
    return recovered
