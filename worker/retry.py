"""Sends that never reached UpesiPay: their time budget (SEND_RETRY_FOR_S), and re-opening a FAILED payment whose
every send provably never reached UpesiPay (`stkpush retry REF`, `POST /payments/{ref}/retry`).

"Provably never sent": every one of its send attempts ended without UpesiPay recording anything (no send time, no
provider reference, not a failure or success the provider reported), and the payment carries no provider
reference. Anything else may have prompted the customer, so re-opening it is refused with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, update
from sqlmodel import col, select

from worker.attempts import attempts_of
from worker.ledger import (
    AttemptOutcome,
    Payment,
    PaymentReopen,
    PaymentState,
    find_by_reference,
    get_payment,
    session_scope,
    utcnow,
)
from worker.logs import log_state_change

log = logging.getLogger("stkpush.retry")

__all__ = ["Reopened", "find_payment", "never_sent_reason", "reopen", "send_budget_start"]

# The reason prefix of a payment FAILED because its sends never reached UpesiPay within SEND_RETRY_FOR_S.
NEVER_SENT = "never sent:"
# Attempt endings that say nothing reached the provider (a guard refusal, a release: a not-sent or refused call).
_NOT_SENT_OUTCOMES = frozenset({AttemptOutcome.REFUSED, AttemptOutcome.RELEASED})


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def last_reopen(engine: Engine, payment_id: str) -> PaymentReopen | None:
    with session_scope(engine) as session:
        return session.exec(
            select(PaymentReopen)
            .where(col(PaymentReopen.payment_id) == payment_id)
            .order_by(col(PaymentReopen.id).desc())
            .limit(1)
        ).first()


def send_budget_start(engine: Engine, payment_id: str, current: str) -> datetime:
    """When the payment's current send budget began: the first of its trailing run of attempts that never reached
    UpesiPay (`current` is the attempt being ended as not sent), since it was last re-opened. Any other attempt
    (sent, refused by the guard, rate limited) ends the run, so time spent waiting on the guard never counts
    against the budget. Derived from the ledger alone: a crash or a redelivery never restarts it."""
    reopened = last_reopen(engine, payment_id)
    since = _aware(reopened.reopened_at) if reopened is not None else None
    start = utcnow()
    for attempt in reversed(attempts_of(engine, payment_id)):
        claimed = _aware(attempt.created_at)
        if since is not None and claimed < since:
            break
        if attempt.id != current and not attempt.not_sent:
            break
        start = min(start, claimed)
    return start


def never_sent_reason(engine: Engine, payment: Payment) -> str | None:
    """None when `payment` is FAILED and provably never reached UpesiPay; otherwise why it can't be re-opened."""
    if payment.state != PaymentState.FAILED:
        return f"the payment is {payment.state.value}, not FAILED: only a failed payment is re-opened"
    if payment.provider_reference is not None or payment.checkout_request_id is not None:
        return (
            "UpesiPay recorded this payment (it has a provider reference): it may have prompted the customer"
        )
    for attempt in attempts_of(engine, payment.id):
        if attempt.outcome is None:
            return f"send attempt {attempt.number} has not ended yet"
        if (
            attempt.sent_at is not None
            or attempt.provider_reference is not None
            or attempt.outcome not in _NOT_SENT_OUTCOMES
        ):
            return (
                f"send attempt {attempt.number} may have reached UpesiPay (it ended {attempt.outcome.value}): "
                "the customer may have been prompted"
            )
    return None


def find_payment(engine: Engine, account: str, ref: str) -> Payment | None:
    """A payment by its external reference, else by its id (the account's own only)."""
    payment = find_by_reference(engine, account, ref)
    if payment is None:
        payment = get_payment(engine, ref)
        if payment is not None and payment.account != account:
            payment = None
    return payment


@dataclass(frozen=True)
class Reopened:
    reopened: bool  # this call moved the payment FAILED -> PENDING
    payment: Payment  # as it stands after the call
    refusal: str | None  # why nothing was done; None when re-opened (or already re-opened)


def reopen(engine: Engine, payment: Payment, by: str) -> Reopened:
    """FAILED -> PENDING for a payment that never reached UpesiPay, recorded in payment_reopen in the same
    transaction. A conditional UPDATE on state (and on the attempt being current) makes two racing callers re-open
    it once; a repeat after it was re-opened (and not yet ended again) answers the same without a second record."""
    reason = never_sent_reason(engine, payment)
    if reason is not None:
        reopened = last_reopen(engine, payment.id)
        if reopened is not None and payment.state in (
            PaymentState.PENDING,
            PaymentState.DEFERRED,
            PaymentState.SENDING,
        ):
            return Reopened(False, payment, None)  # re-opened before: the same answer again
        return Reopened(False, payment, reason)
    now = utcnow()
    statement = update(Payment).where(
        col(Payment.id) == payment.id, col(Payment.state) == PaymentState.FAILED
    )
    if payment.guard_token is None:
        statement = statement.where(col(Payment.guard_token).is_(None))
    else:
        statement = statement.where(col(Payment.guard_token) == payment.guard_token)
    with engine.begin() as connection:
        moved = connection.execute(
            statement.values(
                state=PaymentState.PENDING,
                reason=f"re-opened by {by[:64]}: never reached UpesiPay",
                attempts=0,
                next_attempt_at=None,
                queued_at=None,
                settled_at=None,
                updated_at=now,
            )
        ).rowcount
        if moved == 1:
            connection.execute(
                insert(PaymentReopen).values(
                    payment_id=payment.id,
                    reopened_at=now,
                    reopened_by=by[:64],
                    previous_reason=(payment.reason or "")[:500] or None,
                )
            )
    current = get_payment(engine, payment.id) or payment
    if moved != 1:
        # Another caller re-opened (or changed) it between the read and the update: answer as it now stands.
        return (
            reopen(engine, current, by)
            if current.state == PaymentState.FAILED
            else Reopened(False, current, None)
        )
    log_state_change(payment.id, PaymentState.PENDING.value, "re-opened: never reached UpesiPay")
    log.info("payment %s re-opened by %s: it never reached UpesiPay", payment.id, by[:64])
    return Reopened(True, current, None)


def retry_payment(ref: str, by: str, account: str | None = None) -> Reopened | None:
    """`stkpush retry REF` and `POST /payments/{ref}/retry`: re-open and queue the payment of `account` (None: the
    environment's); None when that account has no such payment. A payment re-opened but not queued (broker away)
    is queued by the dispatcher's stale-PENDING pass."""
    from worker import runtime
    from worker.dispatch import publish_payment

    engine = runtime.engine()
    payment = find_payment(engine, account or runtime.settings().upesipay_account, ref)
    if payment is None:
        return None
    answer = reopen(engine, payment, by)
    if answer.reopened:
        publish_payment(payment.id, queue=payment.queue)
    return answer


def reopen_view(answer: Reopened) -> dict[str, object]:
    """The public answer (no phone, no provider text): what the CLI prints and the API returns."""
    return {
        "id": answer.payment.id,
        "external_reference": answer.payment.external_reference,
        "reopened": answer.reopened,
        "state": answer.payment.state.value,
        "refusal": answer.refusal,
    }
