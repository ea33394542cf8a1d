"""Settling a sent payment: from a callback, or by asking UpesiPay (transaction-status, the transactions list).

Every ending goes through `finish`, which ends one send attempt (worker.attempts.end_attempt: the attempt only if
it has no outcome yet, the payment only while that attempt is current, one transaction) and, only if that ended
it, tells the guard. So a duplicate callback, a callback racing settlement, two beat ticks, or the callback of an
earlier attempt settle their own attempt once, and the guard counts it once.
"""

from __future__ import annotations

import logging
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from worker import ambiguous, batch_brake, metrics, runtime
from worker.attempts import end_attempt, get_attempt, revert_attempt
from worker.dispatch import publish_payment, release_freed
from worker.guard import GuardUnavailable
from worker.ledger import (
    AttemptOutcome,
    Payment,
    PaymentState,
    SendAttempt,
    get_payment,
    mark,
    session_scope,
    utcnow,
)
from worker.reconcile import tell_guard
from worker.upesipay import StatusResult, TransactionStatus

log = logging.getLogger("stkpush.settlement")

# States from which an outcome (callback or status) may end a payment. Not SENDING: a callback that outruns the
# worker recording the 201 can't be checked against UpesiPay's CheckoutRequestID yet, so it is held on the row
# (worker.provider_callback) and applied once the 201 is recorded.
SETTLEABLE = (PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)
# The reason prefix of a failure we assumed (no outcome could be learned): a late success may take it back.
ASSUMED_FAILURE = "unsettled:"

RESULT_SUCCESS = 0
RESULT_CANCELLED = 1032


def state_for_result(result_code: int) -> PaymentState:
    if result_code == RESULT_SUCCESS:
        return PaymentState.SUCCEEDED
    if result_code == RESULT_CANCELLED:
        return PaymentState.CANCELLED
    return PaymentState.FAILED


def finish(payment: Payment, state: PaymentState, attempt_id: str | None = None, **fields: Any) -> bool:
    """End `attempt_id` (default: the payment's current attempt) in `state`; True if this call ended it.

    The payment moves only while that attempt is still its current one; the guard is told either way, once."""
    engine = runtime.engine()
    attempt_id = attempt_id or payment.guard_token
    if attempt_id is None:
        log.warning("payment %s has no send attempt to settle: ignored", payment.id)
        return False
    outcome = AttemptOutcome.SUCCESS if state == PaymentState.SUCCEEDED else AttemptOutcome.FAILURE
    ended = end_attempt(engine, attempt_id, outcome, payment_from=SETTLEABLE, payment_to=state, **fields)
    if ended.attempt_ended:
        if tell_guard(attempt_id, outcome, payment.account):
            try:
                release_freed(payment.phone, payment.account)
            except GuardUnavailable:
                pass  # beat releases it on a later tick; the payment's own ending is already recorded
        if ended.payment_moved:
            log.info("payment %s settled %s", payment.id, state.value)
            if state != PaymentState.SUCCEEDED:
                batch_brake.note_outcome(payment.batch_id)
        else:
            log.warning(
                "payment %s: an earlier attempt ended %s; the current one is untouched", payment.id, state
            )
        return True
    if state == PaymentState.SUCCEEDED:
        return take_back_assumed_failure(payment.id, attempt_id, **fields)
    return False


def take_back_assumed_failure(payment_id: str, attempt_id: str, **fields: Any) -> bool:
    """A success that arrives after we gave up and counted a failure corrects the ledger and the guard."""
    current = get_payment(runtime.engine(), payment_id)
    if current is None or current.state != PaymentState.FAILED:
        return False
    if not (current.reason or "").startswith(ASSUMED_FAILURE):
        return False
    fields.pop("reason", None)
    moved = revert_attempt(runtime.engine(), attempt_id, reason=None, **fields)
    if moved:
        tell_guard(attempt_id, AttemptOutcome.REVERTED, current.account)
        log.warning("payment %s: late success took back an assumed failure", payment_id)
    return moved


def attempt_age(payment: Payment) -> timedelta:
    """How long the current attempt has been out: from when it was sent, else claimed. Polls never move these."""
    attempt = get_attempt(runtime.engine(), payment.guard_token) if payment.guard_token else None
    started = (attempt.sent_at or attempt.created_at) if attempt else (payment.sent_at or payment.created_at)
    if started.tzinfo is None:  # SQLite hands back naive UTC
        started = started.replace(tzinfo=UTC)
    return utcnow() - started


def settle_from_status(payment: Payment, status: StatusResult) -> str:
    """Apply what UpesiPay said about one payment; returns what was done (for logs and tests)."""
    settings = runtime.settings()
    age = attempt_age(payment)
    if status.status == TransactionStatus.SUCCESS:
        changed = finish(
            payment,
            PaymentState.SUCCEEDED,
            receipt=status.receipt,
            provider_reference=payment.provider_reference or status.reference,
            result_code=RESULT_SUCCESS,
            result_desc="settled by transaction-status",
            reason=None,
        )
        return "succeeded" if changed else "unchanged"
    if status.status == TransactionStatus.FAILED:
        changed = finish(
            payment,
            PaymentState.FAILED,
            provider_reference=payment.provider_reference or status.reference,
            result_desc="settled by transaction-status",
            reason="UpesiPay reports the payment failed",
        )
        return "failed" if changed else "unchanged"
    evidence = ambiguous.weigh(payment, status) if payment.state == PaymentState.UNKNOWN else None
    if status.status == TransactionStatus.NOT_FOUND and evidence is not None and evidence.licensed:
        # Enough spaced lookups after the prompt's lifetime agree UpesiPay has no such request
        # (worker/ambiguous.py): sending it now cannot prompt the customer twice.
        if payment.guard_token is None:
            return "unchanged"
        ended = end_attempt(
            runtime.engine(),
            payment.guard_token,
            AttemptOutcome.RELEASED,
            payment_from=[PaymentState.UNKNOWN],
            payment_to=PaymentState.PENDING,
            guard_token=None,
            queued_at=None,
            reason=f"UpesiPay has no such request ({evidence.why}): sending again"[:500],
        )
        if ended.attempt_ended:
            tell_guard(payment.guard_token, AttemptOutcome.RELEASED)
        if ended.payment_moved:
            publish_payment(payment.id, queue=payment.queue)
            return "resent"
        return "unchanged"
    if age >= timedelta(seconds=settings.settle_give_up_s):
        changed = finish(
            payment,
            PaymentState.FAILED,
            reason=f"{ASSUMED_FAILURE} no outcome from UpesiPay after {settings.settle_give_up_s}s "
            f"(last status {status.status.value})",
        )
        return "gave-up" if changed else "unchanged"
    # No answer yet: ask again later rather than on every tick.
    mark(runtime.engine(), payment.id, next_attempt_at=utcnow() + timedelta(seconds=settings.settle_poll_s))
    return "waiting"


def settle_payment(payment: Payment) -> str:
    client = runtime.upesipay_of(payment.account)
    if payment.provider_reference:
        status = client.transaction_status(payment.provider_reference)
    else:
        status = client.find_transaction(payment.external_reference)
    return settle_from_status(payment, status)


def settle_due(limit: int = 200) -> int:
    """Ask UpesiPay about overdue AWAITING_CALLBACK rows and every UNKNOWN row old enough to ask about."""
    settings = runtime.settings()
    now = utcnow()
    awaiting_before = now - timedelta(seconds=settings.settle_after_s)
    unknown_before = now - timedelta(seconds=settings.settle_unknown_after_s)
    # Ages come from the attempt (sent, else claimed), never from updated_at, which every poll refreshes: a row
    # left UNKNOWN by a dead worker still reaches the give-up rule on time.
    started = func.coalesce(col(SendAttempt.sent_at), col(SendAttempt.created_at))
    with session_scope(runtime.engine()) as session:
        rows = session.exec(
            select(Payment)
            .join(SendAttempt, col(SendAttempt.id) == col(Payment.guard_token))
            # Every configured account's, each asked with its own token (settle_payment): a disabled account
            # sends nothing new, but what it sent is still settled.
            .where(col(Payment.account).in_(runtime.accounts(include_disabled=True)))
            .where(
                (
                    (col(Payment.state) == PaymentState.AWAITING_CALLBACK)
                    & (col(SendAttempt.sent_at) <= awaiting_before)
                )
                | ((col(Payment.state) == PaymentState.UNKNOWN) & (started <= unknown_before))
            )
            .where(col(Payment.next_attempt_at).is_(None) | (col(Payment.next_attempt_at) <= now))
            .order_by(started)
            .limit(limit)
        ).all()
    done = 0
    for payment in rows:
        outcome = settle_payment(payment)
        metrics.record_settlement(outcome)
        done += outcome != "waiting"
    return done
