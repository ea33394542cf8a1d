"""ResultCode 1001, "another transaction is in progress on that phone" (docs/upesipay.md: retry after a minute or
more): a failure for the guard (it counts in the window and the number's streak, as UpesiPay counts it) but not
the payment's end. The payment waits IN_PROGRESS_RETRY_S (DEFERRED) and is sent again, as a new send attempt, at
most IN_PROGRESS_RETRIES times; the next 1001 fails it. The guard's busy rule still holds for every new attempt.

How many retries were used is read from the ledger (the payment's attempts that ended as failures: any other
failure ends the payment), so a redelivered callback or a crash never grants an extra one.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import func
from sqlmodel import col, select

from worker import batch_brake, runtime
from worker.attempts import end_attempt
from worker.dispatch import release_freed
from worker.guard import GuardUnavailable
from worker.ledger import AttemptOutcome, Payment, PaymentState, SendAttempt, session_scope, utcnow
from worker.reconcile import tell_guard

log = logging.getLogger("stkpush.in_progress")

RESULT_IN_PROGRESS = 1001
# The states a callback may settle from (worker.settlement.SETTLEABLE; not imported: settlement imports us).
_SETTLEABLE = (PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)


def earlier_failures(payment_id: str, attempt_id: str) -> int:
    with session_scope(runtime.engine()) as session:
        return int(
            session.exec(
                select(func.count())
                .select_from(SendAttempt)
                .where(
                    col(SendAttempt.payment_id) == payment_id,
                    col(SendAttempt.id) != attempt_id,
                    col(SendAttempt.outcome) == AttemptOutcome.FAILURE,
                )
            ).one()
        )


def retry_in_progress(payment: Payment, attempt_id: str | None, **fields: Any) -> bool | None:
    """End the attempt as a failure and defer the payment for another send; None when its retries are used up
    (the caller then fails it as usual), else whether this call ended the attempt."""
    settings = runtime.settings()
    attempt_id = attempt_id or payment.guard_token
    if attempt_id is None:
        return None
    used = earlier_failures(payment.id, attempt_id)
    if used >= settings.in_progress_retries:
        return None
    wait = settings.in_progress_retry_s
    fields["reason"] = (
        f"M-Pesa result {RESULT_IN_PROGRESS} (another transaction in progress on the phone): "
        f"retry {used + 1} of {settings.in_progress_retries} in {wait}s"
    )
    ended = end_attempt(
        runtime.engine(),
        attempt_id,
        AttemptOutcome.FAILURE,
        payment_from=_SETTLEABLE,
        payment_to=PaymentState.DEFERRED,
        next_attempt_at=utcnow() + timedelta(seconds=wait),
        guard_token=None,
        queued_at=None,
        **fields,
    )
    if ended.attempt_ended:
        if tell_guard(attempt_id, AttemptOutcome.FAILURE):
            try:
                release_freed(payment.phone)
            except GuardUnavailable:
                pass  # beat releases it on a later tick
        batch_brake.note_outcome(payment.batch_id)
        log.info("payment %s: another transaction in progress on the phone, retry in %ds", payment.id, wait)
    return ended.attempt_ended
