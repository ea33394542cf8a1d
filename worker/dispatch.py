"""The dispatcher (run by beat): expire waiting payments past their deadline, release due DEFERRED payments lane
by lane within each lane's headroom, re-queue PENDING payments whose message was never sent or was lost, and
recover SENDING rows whose worker died."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func
from sqlmodel import col, select

from worker import bulk_order, runtime
from worker.guard import AccountSnapshot, GuardUnavailable, RefusalReason
from worker.ledger import WAITING_STATES, Payment, PaymentState, mark, session_scope, transition, utcnow

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


EXPIRED_REASON = "not sent before its deadline (expires_at): never prompted"
# States whose sends are (or may be) in flight: a batch's share of the bulk lane is counted in these.
IN_FLIGHT_STATES = (PaymentState.SENDING, PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)


def expire(payment_id: str) -> bool:
    """A waiting payment past its deadline ends EXPIRED; False when it was no longer waiting."""
    return transition(
        runtime.engine(), payment_id, WAITING_STATES, PaymentState.EXPIRED, reason=EXPIRED_REASON
    )


def expire_overdue() -> int:
    """Every PENDING or DEFERRED payment whose deadline has passed ends EXPIRED: it is never sent."""
    now = utcnow()
    with session_scope(runtime.engine()) as session:
        ids = session.exec(
            select(Payment.id)
            .where(col(Payment.state).in_(WAITING_STATES), col(Payment.expires_at) <= now)
            .limit(TICK_LIMIT)
        ).all()
    expired = sum(expire(payment_id) for payment_id in ids)
    if expired:
        log.info("expired %d payments past their deadline", expired)
    return expired


def release_deferred(account: str | None = None) -> int:
    """Expire what is past its deadline, then release due DEFERRED payments lane by lane: single payments within
    the account's headroom, then batch rows within the bulk lane's (shared by batch, docs/guard.md "Lanes").

    Each account is released within its own guard's headroom; None walks every enabled account in turn, so one
    account's backlog or restriction takes nothing from another's."""
    expire_overdue()
    if account is not None:
        return _release_deferred_of(account)
    released = 0
    for name in _accounts_with_due_rows():
        try:
            released += _release_deferred_of(name)
        except GuardUnavailable:
            log.warning("guard of account %s unavailable: its deferred payments wait for the next tick", name)
    return released


def _accounts_with_due_rows() -> list[str]:
    """The enabled accounts with DEFERRED rows the dispatcher may release now (one query), the environment's
    first: a tick costs a guard read per account with work, not per account configured."""
    with session_scope(runtime.engine()) as session:
        due = set(
            session.exec(
                select(Payment.account)
                .where(
                    bulk_order.current().releasable(
                        (col(Payment.state) == PaymentState.DEFERRED)
                        & (col(Payment.next_attempt_at) <= utcnow())
                    )
                )
                .distinct()
            ).all()
        )
    return [name for name in runtime.accounts() if name in due] if due else []


def _release_deferred_of(account: str) -> int:
    snapshot = runtime.guard_of(account).account_snapshot()
    if snapshot.headroom <= 0:
        return 0
    now = utcnow()
    due = (
        (col(Payment.state) == PaymentState.DEFERRED)
        & (col(Payment.next_attempt_at) <= now)
        & (col(Payment.account) == account)
    )
    # A single payment refused for the budget goes as soon as there is room, whatever its retry hint said: the
    # room may come back at this tick, as a failure slides out of the window, with no resolve to release it.
    for_budget = (
        (col(Payment.state) == PaymentState.DEFERRED)
        & (col(Payment.account) == account)
        & (col(Payment.reason) == guard_refusal_reason(RefusalReason.ACCOUNT_BUDGET))
    )
    with session_scope(runtime.engine()) as session:
        singles = session.exec(
            select(Payment.id)
            .where(due | for_budget, col(Payment.queue) == "single")
            .order_by(col(Payment.next_attempt_at), col(Payment.created_at))
            .limit(min(snapshot.headroom, TICK_LIMIT))
        ).all()
    released = sum(_release(payment_id, "single") for payment_id in singles)
    # Each single payment just released will hold a reservation the bulk lane counts too.
    bulk_room = min(snapshot.bulk_headroom - len(singles), TICK_LIMIT)
    # The order may widen `due` (rows waiting only for the lane or the budget): keep it to this account's rows.
    releasable = bulk_order.current().releasable(due) & (col(Payment.account) == account)
    released += sum(_release(payment_id, "bulk") for payment_id in _bulk_turns(releasable, bulk_room))
    if released:
        log.info(
            "released %d deferred payments of account %s (headroom %d, bulk %d)",
            released,
            account,
            snapshot.headroom,
            snapshot.bulk_headroom,
        )
    return released


def _bulk_turns(condition: Any, room: int) -> list[str]:
    """Up to `room` waiting batch rows matching `condition`, shared between batches: each turn goes to the batch
    with the fewest sends in flight (then the oldest row), so a big batch cannot hold the bulk lane for itself."""
    if room <= 0:
        return []
    with session_scope(runtime.engine()) as session:
        waiting = dict(
            session.exec(
                select(Payment.batch_id, func.count())
                .where(condition, col(Payment.queue) == "bulk")
                .group_by(Payment.batch_id)
            ).all()
        )
        if not waiting:
            return []
        in_flight = dict(
            session.exec(
                select(Payment.batch_id, func.count())
                .where(col(Payment.state).in_(IN_FLIGHT_STATES), col(Payment.batch_id).in_(list(waiting)))
                .group_by(Payment.batch_id)
            ).all()
        )
        shares = {batch: 0 for batch in waiting}
        for _ in range(min(room, sum(waiting.values()))):
            open_batches = [batch for batch in shares if shares[batch] < waiting[batch]]
            turn = min(open_batches, key=lambda batch: (in_flight.get(batch, 0) + shares[batch], str(batch)))
            shares[turn] += 1
        ids: list[str] = []
        for batch, share in shares.items():
            if share:
                ids += session.exec(
                    select(Payment.id)
                    .where(condition, col(Payment.queue) == "bulk")
                    # Bulk rows enqueued one by one have no batch: they share one turn.
                    .where(
                        col(Payment.batch_id).is_(None) if batch is None else col(Payment.batch_id) == batch
                    )
                    .order_by(*bulk_order.current().waiting())
                    .limit(share)
                ).all()
    return ids


def release_freed(phone: str, account: str | None = None) -> bool:
    """A resolve just freed a reservation: release, without waiting for beat's next tick, the one payment it
    most likely unblocks: the oldest waiting only for this number to be free, else (while the account has
    headroom) the oldest single payment waiting for the budget, else (while the bulk lane has room) the next
    batch row waiting for the budget or the bulk lane, by batch turn. All within `account` (None: the
    environment's): a resolve frees room in its own account's guard only."""
    name = runtime.account(account).name
    ours = col(Payment.account) == name
    waiting_for_phone = (
        ours
        & (col(Payment.phone) == phone)
        & (col(Payment.reason) == guard_refusal_reason(RefusalReason.PHONE_BUSY))
    )
    if _release_oldest(waiting_for_phone):
        return True
    snapshot: AccountSnapshot = runtime.guard_of(name).account_snapshot()
    if snapshot.headroom <= 0:
        return False
    waiting_for_budget = ours & (col(Payment.reason) == guard_refusal_reason(RefusalReason.ACCOUNT_BUDGET))
    if _release_oldest(waiting_for_budget & (col(Payment.queue) == "single")):
        return True
    waiting_for_lane = (
        (col(Payment.state) == PaymentState.DEFERRED)
        & ours
        & (waiting_for_budget | (col(Payment.reason) == guard_refusal_reason(RefusalReason.BULK_LANE_FULL)))
    )
    return any(
        _release(payment_id, "bulk")
        for payment_id in _bulk_turns(waiting_for_lane, min(snapshot.bulk_headroom, 1))
    )


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
