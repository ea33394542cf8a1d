"""UpesiPay's callback receiver: `POST /callbacks/upesipay/attempts/{attempt id}/{signature}` (and the older
`/callbacks/upesipay/{payment id}/{signature}`, for payments sent before send attempts).

It checks the signature in constant time, the body's types, and the body against the ledger (worker.
provider_callback), answers fast, and is idempotent; a forged, malformed or mismatching callback changes nothing,
is answered 4xx naming the field and the rule, and is logged without personal data. A callback for a payment
whose CheckoutRequestID is not yet known is held (202) and applied when the worker records UpesiPay's 201.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from worker import metrics, runtime
from worker.attempts import attempts_of, get_attempt
from worker.ledger import Payment, PaymentState, SendAttempt, get_payment
from worker.provider_callback import (
    CallbackProblem,
    ProviderCallback,
    apply_callback,
    check_against,
    hold_callback,
    identity_unknown,
    parse_callback,
)
from worker.signing import (
    account_attempt_signature_matches,
    attempt_signature_matches,
    signature_matches,
)

log = logging.getLogger("stkpush.web")

MAX_CALLBACK_BYTES = 64 * 1024

router = APIRouter()


def refused(status: int, problem: CallbackProblem) -> JSONResponse:
    return JSONResponse(
        {"error": str(problem), "errors": [{"field": problem.field, "rule": problem.rule}]},
        status_code=status,
    )


@router.post(
    "/callbacks/upesipay/accounts/{account}/attempts/{attempt_id}/{signature}", include_in_schema=False
)
async def upesipay_account_attempt_callback(
    account: str, attempt_id: str, signature: str, request: Request
) -> JSONResponse:
    """The URL a send of a stored account names: the signature covers the account and the attempt, and the
    attempt must be that account's (a callback can't settle another merchant's payment)."""
    settings = runtime.settings()
    if not account_attempt_signature_matches(
        settings.callback_secret.get_secret_value(), account, attempt_id, signature
    ):
        log.warning("callback with a bad signature refused (attempt id %.12s)", attempt_id)
        return JSONResponse({"error": "forbidden"}, status_code=403)
    return await _settle_attempt(attempt_id, account, request)


@router.post("/callbacks/upesipay/attempts/{attempt_id}/{signature}", include_in_schema=False)
async def upesipay_attempt_callback(attempt_id: str, signature: str, request: Request) -> JSONResponse:
    """The URL every send of the environment's account names since send attempts: the callback settles that
    attempt, and only it."""
    settings = runtime.settings()
    if not attempt_signature_matches(settings.callback_secret.get_secret_value(), attempt_id, signature):
        log.warning("callback with a bad signature refused (attempt id %.12s)", attempt_id)
        return JSONResponse({"error": "forbidden"}, status_code=403)
    return await _settle_attempt(attempt_id, settings.upesipay_account, request)


async def _settle_attempt(attempt_id: str, account: str, request: Request) -> JSONResponse:
    attempt = get_attempt(runtime.engine(), attempt_id)
    if attempt is None or attempt.account != account:
        # Another account's attempt is answered like an unknown one: the URL says nothing about other accounts.
        log.warning("callback for unknown attempt %.12s of account %s refused", attempt_id, account[:64])
        return JSONResponse({"error": "unknown payment"}, status_code=404)
    return await _settle(attempt.payment_id, attempt, request)


@router.post("/callbacks/upesipay/{payment_id}/{signature}", include_in_schema=False)
async def upesipay_callback(payment_id: str, signature: str, request: Request) -> JSONResponse:
    """The URL shape of payments sent before send attempts: it names the payment, so it settles the current (else
    the latest) attempt."""
    settings = runtime.settings()
    if not signature_matches(settings.callback_secret.get_secret_value(), payment_id, signature):
        log.warning("callback with a bad signature refused (payment id %.12s)", payment_id)
        return JSONResponse({"error": "forbidden"}, status_code=403)
    return await _settle(payment_id, None, request, settings.upesipay_account)


async def _settle(
    payment_id: str, attempt: SendAttempt | None, request: Request, account: str | None = None
) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_CALLBACK_BYTES:
        return refused(413, CallbackProblem("body", f"must be at most {MAX_CALLBACK_BYTES} bytes"))
    try:
        callback = parse_callback(body)
    except CallbackProblem as problem:
        log.warning("callback for payment %s refused: %s", payment_id, problem)
        return refused(400, problem)
    payment = get_payment(runtime.engine(), payment_id)
    if payment is None or (account is not None and payment.account != account):
        log.warning("callback for unknown payment %.12s refused", payment_id)
        return JSONResponse({"error": "unknown payment"}, status_code=404)
    if attempt is None:
        attempts = attempts_of(runtime.engine(), payment.id)
        current = [a for a in attempts if a.id == payment.guard_token]
        attempt = current[0] if current else (attempts[-1] if attempts else None)
    if attempt is not None and attempt.id != payment.guard_token:
        # An earlier attempt's callback settles that attempt alone, checked against what UpesiPay told it.
        return _settle_earlier(
            payment.model_copy(update={"checkout_request_id": attempt.checkout_request_id}), attempt, callback
        )
    for _ in range(2):  # once more if the row moved on while the callback was being held
        try:
            check_against(payment, callback)
        except CallbackProblem as problem:
            log.warning("callback for payment %s refused: %s", payment.id, problem)
            return refused(400, problem)
        if not identity_unknown(payment):
            break
        if hold_callback(payment, callback):
            if payment.state == PaymentState.FAILED:
                log.warning(
                    "late callback for payment %s held: its CheckoutRequestID can't be checked (the payment was "
                    "given up on unsettled); reconcile it with UpesiPay",
                    payment.id,
                )
            else:
                log.info("callback for payment %s held until UpesiPay's answer is recorded", payment.id)
            return JSONResponse({"status": "held"}, status_code=202)
        payment = get_payment(runtime.engine(), payment_id) or payment
    else:
        return JSONResponse({"error": "the payment is changing: send the callback again"}, status_code=409)
    changed = apply_callback(payment, callback, attempt.id if attempt is not None else None)
    metrics.record_callback(callback.result_code, changed)
    log.info(
        "callback for payment %s: result %d, %s",
        payment.id,
        callback.result_code,
        "applied" if changed else "duplicate",
    )
    return JSONResponse({"status": "applied" if changed else "duplicate"})


def _settle_earlier(checked: Payment, attempt: SendAttempt, callback: ProviderCallback) -> JSONResponse:
    try:
        check_against(checked, callback)
    except CallbackProblem as problem:
        log.warning("callback for an earlier attempt of payment %s refused: %s", checked.id, problem)
        return refused(400, problem)
    if not checked.checkout_request_id:
        # UpesiPay's answer to that attempt was never recorded: nothing can tell this callback from a forged one.
        log.warning("callback for an earlier attempt of payment %s ignored: it can't be verified", checked.id)
        return JSONResponse(
            {"error": "the attempt's CheckoutRequestID is not known: not applied"}, status_code=409
        )
    changed = apply_callback(checked, callback, attempt.id)
    metrics.record_callback(callback.result_code, changed)
    log.info(
        "callback for an earlier attempt of payment %s: %s", checked.id, "applied" if changed else "duplicate"
    )
    return JSONResponse({"status": "applied" if changed else "duplicate"})
