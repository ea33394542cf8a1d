"""Settling a sent payment: from a callback, or by asking UpesiPay (transaction-status, the transactions list).

Every ending goes through `finish`, which moves the ledger row with one conditional UPDATE and, only if that
moved it, tells the guard. So a duplicate callback, a callback racing settlement, or two beat ticks settle a
payment once, and the guard counts it once.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlmodel import col, select

from worker import batch_brake, metrics, runtime
from worker.dispatch import publish_payment, release_freed
from worker.guard import Outcome
from worker.ledger import Payment, PaymentState, get_payment, mark, session_scope, transition, utcnow
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


def finish(payment: Payment, state: PaymentState, **fields: Any) -> bool:
    """End `payment` in `state`; True if this call ended it (and so told the guard)."""
    engine = runtime.engine()
    moved = transition(engine, payment.id, SETTLEABLE, state, **fields)
    if moved:
        outcome = Outcome.SUCCESS if state == PaymentState.SUCCEEDED else Outcome.FAILURE
        if payment.guard_token:
            runtime.guard().resolve(payment.guard_token, outcome)
            release_freed(payment.phone)
        log.info("payment %s settled %s", payment.id, state.value)
        if state != PaymentState.SUCCEEDED:
            batch_brake.note_outcome(payment.batch_id)
        return True
    if state == PaymentState.SUCCEEDED:
        return take_back_assumed_failure(payment.id, **fields)
    return False


def take_back_assumed_failure(payment_id: str, **fields: Any) -> bool:
    """A success that arrives after we gave up and counted a failure corrects the ledger and the guard."""
    current = get_payment(runtime.engine(), payment_id)
    if current is None or current.state != PaymentState.FAILED:
        return False
    if not (current.reason or "").startswith(ASSUMED_FAILURE):
        return False
    moved = transition(runtime.engine(), payment_id, [PaymentState.FAILED], PaymentState.SUCCEEDED, **fields)
    if moved and current.guard_token:
        runtime.guard().revert_failure(current.guard_token)
        log.warning("payment %s: late success took back an assumed failure", payment_id)
    return moved


def settle_from_status(payment: Payment, status: StatusResult) -> str:
    """Apply what UpesiPay said about one payment; returns what was done (for logs and tests)."""
    settings = runtime.settings()
    age = utcnow() - (payment.sent_at or payment.updated_at)
    if status.status == TransactionStatus.SUCCESS:
        finish(
            payment,
            PaymentState.SUCCEEDED,
            receipt=status.receipt,
            provider_reference=payment.provider_reference or status.reference,
            result_code=RESULT_SUCCESS,
            result_desc="settled by transaction-status",
            reason=None,
        )
        return "succeeded"
    if status.status == TransactionStatus.FAILED:
        finish(
            payment,
            PaymentState.FAILED,
            provider_reference=payment.provider_reference or status.reference,
            result_desc="settled by transaction-status",
            reason="UpesiPay reports the payment failed",
        )
        return "failed"
    if status.status == TransactionStatus.NOT_FOUND and payment.provider_reference is None:
        # Every page of UpesiPay's transactions was read and none carries this reference: the request never
        # reached UpesiPay, so sending it now cannot prompt the customer twice.
        moved = transition(
            runtime.engine(),
            payment.id,
            [PaymentState.UNKNOWN],
            PaymentState.PENDING,
            guard_token=None,
            queued_at=None,
            reason="UpesiPay has no such request: sending again",
        )
        if moved:
            if payment.guard_token:
                runtime.guard().resolve(payment.guard_token, Outcome.RELEASED)
            publish_payment(payment.id, queue=payment.queue)
            return "resent"
        return "unchanged"
    if age >= timedelta(seconds=settings.settle_give_up_s):
        finish(
            payment,
            PaymentState.FAILED,
            reason=f"{ASSUMED_FAILURE} no outcome from UpesiPay after {settings.settle_give_up_s}s "
            f"(last status {status.status.value})",
        )
        return "gave-up"
    # No answer yet: ask again later rather than on every tick.
    mark(runtime.engine(), payment.id, next_attempt_at=utcnow() + timedelta(seconds=settings.settle_poll_s))
    return "waiting"


def settle_payment(payment: Payment) -> str:
    client = runtime.upesipay()
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
    with session_scope(runtime.engine()) as session:
        rows = session.exec(
            select(Payment)
            .where(
                (
                    (col(Payment.state) == PaymentState.AWAITING_CALLBACK)
                    & (col(Payment.sent_at) <= awaiting_before)
                )
                | ((col(Payment.state) == PaymentState.UNKNOWN) & (col(Payment.updated_at) <= unknown_before))
            )
            .where(col(Payment.next_attempt_at).is_(None) | (col(Payment.next_attempt_at) <= now))
            .order_by(col(Payment.updated_at))
            .limit(limit)
        ).all()
    done = 0
    for payment in rows:
        outcome = settle_payment(payment)
        metrics.record_settlement(outcome)
        done += outcome != "waiting"
    return done
