"""Send one payment: claim it, ask the guard, call UpesiPay, record what the answer means.

The table "What an answer proves" in docs/ARCHITECTURE.md says what each answer causes."""

from __future__ import annotations

import logging
import random
import secrets
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from worker import batch_brake, bulk_turns, metrics, provider_blocks, retry, runtime
from worker.accounts import UnknownAccount
from worker.attempts import claim_for_send, end_attempt, record_guard_block, record_sent
from worker.dispatch import expire, guard_refusal_reason
from worker.faults import fail_point
from worker.guard import GuardUnavailable, Lane, RefusalReason
from worker.ledger import AttemptOutcome, GuardBlockKind, Payment, PaymentState, get_payment, utcnow
from worker.phones import mask_phone
from worker.provider_callback import apply_held
from worker.reconcile import admit, tell_guard
from worker.signing import attempt_callback_url
from worker.upesipay import PushOutcome, PushRequest, PushResult, RestrictionScope

log = logging.getLogger("stkpush.sending")

# Refusals during which a rebuild may be reading the ledger: the attempt is released rather than just refused.
UNSURE_REFUSALS = frozenset({RefusalReason.GUARD_REBUILDING, RefusalReason.GUARD_UNAVAILABLE})
# How many times a bulk message asks for its turn when racing turns took every candidate it was given.
BULK_TURN_ROUNDS = 3
# When UpesiPay says "rate limited" without a Retry-After and names neither a number nor the account.
DEFAULT_RATE_LIMIT_WAIT_S = provider_blocks.THROTTLE_WAIT_S


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


def defer(token: str, seconds: float, reason: str, outcome: AttemptOutcome = AttemptOutcome.REFUSED) -> bool:
    """End the attempt `token` and put its payment back to wait in the database (DEFERRED)."""
    return end_attempt(
        runtime.engine(),
        token,
        outcome,
        payment_from=[PaymentState.SENDING],
        payment_to=PaymentState.DEFERRED,
        guard_told=outcome == AttemptOutcome.REFUSED,
        next_attempt_at=utcnow() + timedelta(seconds=max(seconds, 0.0)),
        reason=reason[:500],
        guard_token=None,
    ).payment_moved


def provider_block_wait(payment: Payment, result: PushResult) -> float:
    """The stated end of a block or restriction, else the rule's own duration (worker.provider_blocks)."""
    settings, guard = runtime.settings(), runtime.guard_of(payment.account)
    failures = 0
    if result.retry_after_s is None and result.scope == RestrictionScope.ACCOUNT:
        failures = provider_blocks.account_failures_in_window(
            runtime.engine(), payment.account, settings.account_window_s
        )
        try:
            failures = max(failures, guard.account_snapshot().failures_in_window)
        except GuardUnavailable:
            pass  # the ledger's count stands
    return provider_blocks.block_wait_s(result, failures, guard.limits, settings.provider_block_wait_s)


def account_unusable(account: str) -> str | None:
    """Why nothing may be sent for `account` now (unknown or disabled), None when it may."""
    try:
        config = runtime.account(account)
    except UnknownAccount:
        return f"account {account} is not configured: waiting"
    if config.disabled:
        return f"account {account} is disabled: waiting"
    return None


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
    own = payment
    token: str | None = None
    # A bulk message whose candidates were all claimed by racing turns meanwhile (its own row taken by another
    # batch's turn, that turn's target by a third) asks for the turns again: else a row of another batch would be
    # left PENDING without a message until requeue_stale_pending, minutes later.
    for _round in range(BULK_TURN_ROUNDS if own.queue == "bulk" else 1):
        current = own if _round == 0 else get_payment(engine, own.id) or own
        turns = bulk_turns.candidates(current) if own.queue == "bulk" else [own.id]
        for candidate_id in turns:
            candidate = current if candidate_id == own.id else get_payment(engine, candidate_id)
            if candidate is None:
                continue
            done, claimed = _claim(candidate)
            if done is not None:
                return done, None
            if claimed is not None:
                payment, token = candidate, claimed
                break
        if token is not None:
            break
    if token is None:
        log.info("payment %s not claimable (state %s): skipped", payment.id, payment.state)
        return SendResult.NOT_CLAIMABLE, None

    fail_point("after-claim")
    # Everything below is the payment's own account's: its guard, its pause, its token and channel. Another
    # account's restriction or refused credentials never reaches this payment.
    account = payment.account
    unusable = account_unusable(account)
    if unusable is not None:
        defer(token, runtime.settings().credentials_probe_s, unusable)
        log.warning("payment %s waits: %s", payment.id, unusable)
        return SendResult.PAUSED, None
    pause = runtime.credentials_pause_of(account).remaining_s()
    if pause > 0:
        defer(token, pause, "sending paused: UpesiPay refused the credentials")
        return SendResult.PAUSED, None
    decision = admit(payment.phone, token, lane_of(payment), account)
    metrics.record_guard_decision(decision)
    if not decision.admitted:
        reason = decision.reason or RefusalReason.GUARD_UNAVAILABLE
        if reason in UNSURE_REFUSALS:
            # A rebuild running now may have read this attempt while it was open and reserved it: the guard
            # is told to release it (now, or by beat if Redis is still away).
            if defer(token, decision.retry_after, guard_refusal_reason(reason), AttemptOutcome.RELEASED):
                tell_guard(token, AttemptOutcome.RELEASED, account)
        else:
            defer(token, decision.retry_after, guard_refusal_reason(reason))
        log.info(
            "payment %s deferred by the guard (%s) for %.0fs", payment.id, reason.value, decision.retry_after
        )
        return SendResult.DEFERRED, None

    settings = runtime.settings()
    result = runtime.upesipay_of(account).initiate_push(
        PushRequest(
            amount=payment.amount,
            phone=payment.phone,
            channel_id=payment.channel_id,
            external_reference=payment.external_reference,
            customer_name=payment.customer_name,
            callback_url=attempt_callback_url(settings, token, account),
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
    # The claim is the only way into SENDING, and it opens the attempt in the same transaction: a redelivered
    # message, or a second worker, finds the row already claimed (or past it) and sends nothing. A batch row's
    # claim also asks its batch's brake.
    if payment.batch_id is not None:
        claimed = batch_brake.claim(payment, token)
        if claimed in (batch_brake.Claim.HELD, batch_brake.Claim.THROTTLED):
            return SendResult.HELD, None
        return None, (token if claimed == batch_brake.Claim.CLAIMED else None)
    return None, (token if claim_for_send(runtime.engine(), payment.id, token) else None)


def record(payment: Payment, token: str, result: PushResult) -> tuple[SendResult, Retry | None]:
    metrics.record_push(result)
    engine = runtime.engine()
    account = payment.account
    guard = runtime.guard_of(account)
    evidence: dict[str, Any] = {
        "provider_status_code": result.status_code,
        "provider_response": result.raw[:2048] if result.raw else None,
    }
    masked = mask_phone(payment.phone)
    match result.outcome:
        case PushOutcome.ACCEPTED:
            # If the dispatcher took the row for a dead worker's (UNKNOWN) meanwhile, the references are kept on
            # it so settlement asks about this very request.
            moved = record_sent(
                engine,
                token,
                PaymentState.AWAITING_CALLBACK,
                provider_reference=result.reference,
                checkout_request_id=result.checkout_request_id,
                reason=None,
                **evidence,
            )
            log.info("payment %s accepted by UpesiPay for %s", payment.id, masked)
            if moved and apply_held(payment.id):
                log.info("payment %s settled by a callback held until now", payment.id)
            return SendResult.ACCEPTED, None
        case PushOutcome.REJECTED:
            # UpesiPay may count a refused request against the account: so does the guard.
            ended = end_attempt(
                engine,
                token,
                AttemptOutcome.FAILURE,
                payment_from=[PaymentState.SENDING],
                payment_to=PaymentState.REJECTED,
                reason=result.detail[:500],
                **evidence,
            )
            if ended.attempt_ended:
                tell_guard(token, AttemptOutcome.FAILURE, account)
            batch_brake.note_outcome(payment.batch_id)
            log.warning("payment %s rejected by UpesiPay: %s", payment.id, result.detail)
            return SendResult.REJECTED, None
        case PushOutcome.CREDENTIALS_REFUSED:
            probe_s = runtime.settings().credentials_probe_s
            runtime.credentials_pause_of(account).pause(probe_s)
            if defer(token, probe_s, "UpesiPay refused the credentials", AttemptOutcome.RELEASED):
                tell_guard(token, AttemptOutcome.RELEASED, account)
            log.error(
                "UpesiPay refused the credentials of account %s (HTTP %s): its sending paused for %.0fs; check "
                "%s",
                account,
                result.status_code,
                probe_s,
                "UPESIPAY_AUTH_TOKEN"
                if runtime.account(account).from_environment
                else "its token (stkpush account set)",
            )
            return SendResult.PAUSED, None
        case PushOutcome.RATE_LIMITED:
            wait = provider_block_wait(payment, result)
            until = utcnow() + timedelta(seconds=wait)
            # The ledger first: a guard rebuilt from it must still honour the provider's word.
            if result.scope == RestrictionScope.PHONE:
                record_guard_block(
                    engine, payment.account, GuardBlockKind.PHONE, until, "provider", payment.phone
                )
                guard.block_phone(payment.phone, wait)
            else:
                reason = "provider: " + result.detail[:100]
                record_guard_block(engine, payment.account, GuardBlockKind.ACCOUNT, until, reason)
                guard.restrict_account(wait, reason)
            if defer(
                token, wait, f"UpesiPay rate limit ({result.scope}): {result.detail}", AttemptOutcome.RELEASED
            ):
                tell_guard(token, AttemptOutcome.RELEASED, account)
            log.warning("payment %s: UpesiPay rate limited (%s) for %.0fs", payment.id, result.scope, wait)
            return SendResult.DEFERRED, None
        case PushOutcome.NOT_SENT:
            # Nothing reached UpesiPay: retried with capped backoff for SEND_RETRY_FOR_S from the first attempt
            # of this run (worker.retry), however many attempts an outage takes; the deadline still wins.
            attempts = payment.attempts + 1
            budget_s = runtime.settings().send_retry_for_s
            started = retry.send_budget_start(engine, payment.id, token)
            if utcnow() - started >= timedelta(seconds=budget_s):
                if end_attempt(
                    engine,
                    token,
                    AttemptOutcome.RELEASED,
                    payment_from=[PaymentState.SENDING],
                    payment_to=PaymentState.FAILED,
                    attempt_fields={"not_sent": True},
                    attempts=attempts,
                    reason=f"{retry.NEVER_SENT} UpesiPay unreachable for {budget_s}s ({attempts} attempts): "
                    f"{result.detail}"[:500],
                ).attempt_ended:
                    tell_guard(token, AttemptOutcome.RELEASED, account)
                log.error(
                    "payment %s failed: UpesiPay unreachable for %ds (%d attempts), never sent",
                    payment.id,
                    budget_s,
                    attempts,
                )
                return SendResult.GAVE_UP, None
            countdown = backoff_s(attempts)
            if end_attempt(
                engine,
                token,
                AttemptOutcome.RELEASED,
                payment_from=[PaymentState.SENDING],
                payment_to=PaymentState.PENDING,
                attempt_fields={"not_sent": True},
                attempts=attempts,
                guard_token=None,
                reason=f"not sent ({result.detail}); retry {attempts} in {countdown:.1f}s"[:500],
                queued_at=None,
            ).attempt_ended:
                tell_guard(token, AttemptOutcome.RELEASED, account)
            return SendResult.RETRY, Retry(countdown)
        case PushOutcome.AMBIGUOUS:
            # The request may have reached UpesiPay: resending could prompt the customer twice. The reservation
            # stays held until settlement learns what happened.
            record_sent(
                engine,
                token,
                PaymentState.UNKNOWN,
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
