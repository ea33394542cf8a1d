"""Send one payment: claim it, ask the guard, call UpesiPay, record what the answer means.

The table "What an answer proves" in docs/ARCHITECTURE.md says what each answer causes."""

from __future__ import annotations

import logging
import os
import random
import secrets
import signal
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from pathlib import Path

from worker import batch_brake, bulk_turns, metrics, runtime
from worker.dispatch import expire, guard_refusal_reason
from worker.guard import Lane, Outcome, RefusalReason
from worker.ledger import Payment, PaymentState, get_payment, mark, transition, utcnow
from worker.phones import mask_phone
from worker.provider_callback import apply_held
from worker.signing import callback_url
from worker.upesipay import PushOutcome, PushRequest, PushResult, RestrictionScope

log = logging.getLogger("stkpush.sending")

# When UpesiPay says "rate limited" without a Retry-After, wait this long before asking again.
DEFAULT_RATE_LIMIT_WAIT_S = 60.0


class SendResult(StrEnum):
    """What one stk_push delivery did; the task returns it (logged by Celery, no personal data)."""

    MISSING = "missing"
    NOT_CLAIMABLE = "not-claimable"  # another delivery owns it, or it already went out
    DEFERRED = "deferred"
    PAUSED = "paused"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"
    GAVE_UP = "gave-up"
    UNKNOWN = "unknown"
    EXPIRED = "expired"  # past its deadline before it could be sent: never sent
    HELD = "held"  # its batch is paused, or has too many sends unanswered or rejected in a row


@dataclass(frozen=True)
class Retry:
    """The caller re-publishes the payment after `countdown_s` (the message carries only the id)."""

    countdown_s: float


def backoff_s(attempt: int) -> float:
    """Exponential backoff with full jitter, capped below half the visibility timeout (see settings)."""
    settings = runtime.settings()
    ceiling = min(settings.send_backoff_cap_s, settings.send_backoff_base_s * 2 ** max(attempt - 1, 0))
    countdown = random.uniform(ceiling / 2, ceiling)
    assert countdown <= settings.visibility_timeout_s / 2
    return countdown


def defer(payment: Payment, seconds: float, reason: str, from_state: PaymentState) -> None:
    transition(
        runtime.engine(),
        payment.id,
        [from_state],
        PaymentState.DEFERRED,
        next_attempt_at=utcnow() + timedelta(seconds=max(seconds, 0.0)),
        reason=reason[:500],
        guard_token=None,
    )


def lane_of(payment: Payment) -> Lane:
    """The guard's lane follows the payment's queue, so it can always be told again from the ledger."""
    return Lane.BULK if payment.queue == "bulk" else Lane.INTERACTIVE


def send_payment(payment_id: str) -> tuple[SendResult, Retry | None]:
    engine = runtime.engine()
    payment = get_payment(engine, payment_id)
    if payment is None:
        log.warning("stk_push for unknown payment %s: nothing to do", payment_id)
        return SendResult.MISSING, None
    # A batch row's message is a turn of the bulk lane: it may send another batch's row (worker.bulk_turns).
    turns = bulk_turns.candidates(payment) if payment.queue == "bulk" else [payment.id]
    for candidate_id in turns:
        candidate = payment if candidate_id == payment.id else get_payment(engine, candidate_id)
        if candidate is None:
            continue
        done, claimed = _claim(candidate)
        if done is not None:
            return done, None
        if claimed is not None:
            payment, token = candidate, claimed
            break
    else:
        log.info("payment %s not claimable (state %s): skipped", payment.id, payment.state)
        return SendResult.NOT_CLAIMABLE, None

    fail_point("after-claim")
    guard = runtime.guard()
    pause = runtime.credentials_pause().remaining_s()
    if pause > 0:
        defer(payment, pause, "sending paused: UpesiPay refused the credentials", PaymentState.SENDING)
        return SendResult.PAUSED, None
    decision = guard.admit(payment.phone, token, lane_of(payment))
    metrics.record_guard_decision(decision)
    if not decision.admitted:
        reason = decision.reason or RefusalReason.GUARD_UNAVAILABLE
        defer(payment, decision.retry_after, guard_refusal_reason(reason), PaymentState.SENDING)
        log.info(
            "payment %s deferred by the guard (%s) for %.0fs", payment.id, reason.value, decision.retry_after
        )
        return SendResult.DEFERRED, None

    settings = runtime.settings()
    result = runtime.upesipay().initiate_push(
        PushRequest(
            amount=payment.amount,
            phone=payment.phone,
            channel_id=payment.channel_id,
            external_reference=payment.external_reference,
            customer_name=payment.customer_name,
            callback_url=callback_url(settings, payment.id),
        )
    )
    fail_point("after-send")
    return record(payment, token, result)


def _claim(payment: Payment) -> tuple[SendResult | None, str | None]:
    """Claim `payment` for sending: (None, token) when claimed, (result, None) when this delivery is done with
    it (expired, or held by its batch), (None, None) when another delivery owns it."""
    if payment.expires_at is not None and payment.expires_at <= utcnow():
        # The customer has likely left the checkout: a late prompt would only confuse (or be paid twice).
        return (SendResult.EXPIRED if expire(payment.id) else None), None
    token = f"{payment.id}.{secrets.token_hex(4)}"
    # The claim is the only way into SENDING: a redelivered message, or a second worker, finds the row already
    # claimed (or past it) and sends nothing. A batch row's claim also asks its batch's brake.
    if payment.batch_id is not None:
        claimed = batch_brake.claim(payment, token)
        if claimed in (batch_brake.Claim.HELD, batch_brake.Claim.THROTTLED):
            return SendResult.HELD, None
        return None, (token if claimed == batch_brake.Claim.CLAIMED else None)
    moved = transition(
        runtime.engine(),
        payment.id,
        [PaymentState.PENDING],
        PaymentState.SENDING,
        guard_token=token,
        next_attempt_at=None,
    )
    return None, (token if moved else None)


def fail_point(name: str) -> None:
    """Reliability tests kill the worker here, once (see Settings.fault_kill_at); a no-op in production."""
    settings = runtime.settings()
    if settings.fault_kill_at != name or not settings.fault_marker_file:
        return
    marker = Path(settings.fault_marker_file)
    try:
        marker.touch(exist_ok=False)
    except FileExistsError:
        return
    log.warning("fail-point %s: killing this worker process", name)
    os.kill(os.getpid(), signal.SIGKILL)


def record(payment: Payment, token: str, result: PushResult) -> tuple[SendResult, Retry | None]:
    metrics.record_push(result)
    engine = runtime.engine()
    guard = runtime.guard()
    evidence = {
        "provider_status_code": result.status_code,
        "provider_response": result.raw[:2048] if result.raw else None,
    }
    masked = mask_phone(payment.phone)
    match result.outcome:
        case PushOutcome.ACCEPTED:
            moved = transition(
                engine,
                payment.id,
                [PaymentState.SENDING],
                PaymentState.AWAITING_CALLBACK,
                provider_reference=result.reference,
                checkout_request_id=result.checkout_request_id,
                sent_at=utcnow(),
                reason=None,
                **evidence,
            )
            if not moved:
                # The dispatcher took the row for a dead worker's (UNKNOWN) meanwhile; keep the reference so
                # settlement asks transaction-status about this very request.
                mark(engine, payment.id, provider_reference=result.reference, sent_at=utcnow())
            log.info("payment %s accepted by UpesiPay for %s", payment.id, masked)
            if moved and apply_held(payment.id):
                log.info("payment %s settled by a callback held until now", payment.id)
            return SendResult.ACCEPTED, None
        case PushOutcome.REJECTED:
            transition(
                engine,
                payment.id,
                [PaymentState.SENDING],
                PaymentState.REJECTED,
                reason=result.detail[:500],
                **evidence,
            )
            # UpesiPay may count a refused request against the account: so does the guard.
            guard.resolve(token, Outcome.FAILURE)
            batch_brake.note_outcome(payment.batch_id)
            log.warning("payment %s rejected by UpesiPay: %s", payment.id, result.detail)
            return SendResult.REJECTED, None
        case PushOutcome.CREDENTIALS_REFUSED:
            guard.resolve(token, Outcome.RELEASED)
            probe_s = runtime.settings().credentials_probe_s
            runtime.credentials_pause().pause(probe_s)
            defer(payment, probe_s, "UpesiPay refused the credentials", PaymentState.SENDING)
            log.error(
                "UpesiPay refused the credentials (HTTP %s): all sending paused for %.0fs; check "
                "UPESIPAY_AUTH_TOKEN",
                result.status_code,
                probe_s,
            )
            return SendResult.PAUSED, None
        case PushOutcome.RATE_LIMITED:
            wait = result.retry_after_s if result.retry_after_s is not None else DEFAULT_RATE_LIMIT_WAIT_S
            guard.resolve(token, Outcome.RELEASED)
            if result.scope == RestrictionScope.PHONE:
                guard.block_phone(payment.phone, wait)
            else:
                guard.restrict_account(wait, "provider: " + result.detail[:100])
            defer(
                payment, wait, f"UpesiPay rate limit ({result.scope}): {result.detail}", PaymentState.SENDING
            )
            log.warning("payment %s: UpesiPay rate limited (%s) for %.0fs", payment.id, result.scope, wait)
            return SendResult.DEFERRED, None
        case PushOutcome.NOT_SENT:
            guard.resolve(token, Outcome.RELEASED)
            attempts = payment.attempts + 1
            if attempts >= runtime.settings().send_max_attempts:
                transition(
                    engine,
                    payment.id,
                    [PaymentState.SENDING],
                    PaymentState.FAILED,
                    attempts=attempts,
                    reason=f"could not reach UpesiPay after {attempts} attempts: {result.detail}"[:500],
                )
                log.error("payment %s failed: UpesiPay unreachable after %d attempts", payment.id, attempts)
                return SendResult.GAVE_UP, None
            countdown = backoff_s(attempts)
            transition(
                engine,
                payment.id,
                [PaymentState.SENDING],
                PaymentState.PENDING,
                attempts=attempts,
                guard_token=None,
                reason=f"not sent ({result.detail}); retry {attempts} in {countdown:.1f}s"[:500],
                queued_at=None,
            )
            return SendResult.RETRY, Retry(countdown)
        case PushOutcome.AMBIGUOUS:
            # The request may have reached UpesiPay: resending could prompt the customer twice. The reservation
            # stays held until settlement learns what happened.
            transition(
                engine,
                payment.id,
                [PaymentState.SENDING],
                PaymentState.UNKNOWN,
                sent_at=utcnow(),
                reason=f"outcome unknown: {result.detail}"[:500],
                **evidence,
            )
            log.warning(
                "payment %s outcome unknown (%s): will settle, never resend blindly",
                payment.id,
                result.detail,
            )
            return SendResult.UNKNOWN, None
    raise AssertionError(f"unhandled push outcome {result.outcome}")  # pragma: no cover
