"""UpesiPay's callback receiver: `POST /callbacks/upesipay/attempts/{attempt id}/{signature}` (and the older
`/callbacks/upesipay/{payment id}/{signature}`, for payments sent before send attempts).

It checks the signature in constant time, checks the body against the ledger, answers 200 fast, and is
idempotent; a forged or mismatching callback changes nothing and is logged without personal data.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from worker import metrics, runtime
from worker.attempts import attempts_of, get_attempt
from worker.ledger import Payment, SendAttempt, get_payment
from worker.phones import PhoneNumberError, normalise_phone
from worker.settlement import RESULT_SUCCESS, finish, state_for_result
from worker.signing import attempt_signature_matches, signature_matches

log = logging.getLogger("stkpush.web")

MAX_CALLBACK_BYTES = 64 * 1024

router = APIRouter()


def callback_mismatch(payment: Payment, response: dict[str, Any]) -> str | None:
    """The name of the first callback field that contradicts the ledger, or None."""
    if response.get("ExternalReference") not in (None, "", payment.external_reference):
        return "ExternalReference"
    checkout = response.get("CheckoutRequestID")
    if payment.checkout_request_id and checkout != payment.checkout_request_id:
        return "CheckoutRequestID"
    amount = response.get("Amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float) or amount != payment.amount:
        return "Amount"
    phone = response.get("Phone")
    try:
        if not isinstance(phone, str) or normalise_phone(phone) != payment.phone:
            return "Phone"
    except PhoneNumberError:
        return "Phone"
    result_code = response.get("ResultCode")
    if isinstance(result_code, bool) or not isinstance(result_code, int):
        return "ResultCode"
    return None


@router.post("/callbacks/upesipay/attempts/{attempt_id}/{signature}", include_in_schema=False)
async def upesipay_attempt_callback(attempt_id: str, signature: str, request: Request) -> JSONResponse:
    """The URL every send names since send attempts: the callback settles that attempt, and only it."""
    settings = runtime.settings()
    if not attempt_signature_matches(settings.callback_secret.get_secret_value(), attempt_id, signature):
        log.warning("callback with a bad signature refused (attempt id %.12s)", attempt_id)
        return JSONResponse({"error": "forbidden"}, status_code=403)
    attempt = get_attempt(runtime.engine(), attempt_id)
    if attempt is None:
        log.warning("callback for unknown attempt %.12s refused", attempt_id)
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
    return await _settle(payment_id, None, request)


async def _settle(payment_id: str, attempt: SendAttempt | None, request: Request) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_CALLBACK_BYTES:
        return JSONResponse({"error": "body too large"}, status_code=413)
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        log.warning("callback for payment %s refused: body is not JSON", payment_id)
        return JSONResponse({"error": "body must be JSON"}, status_code=400)
    response = document.get("response") if isinstance(document, dict) else None
    if not isinstance(response, dict):
        log.warning("callback for payment %s refused: no response object", payment_id)
        return JSONResponse({"error": "body must hold a response object"}, status_code=400)
    payment = get_payment(runtime.engine(), payment_id)
    if payment is None:
        log.warning("callback for unknown payment %.12s refused", payment_id)
        return JSONResponse({"error": "unknown payment"}, status_code=404)
    if attempt is None:
        attempts = attempts_of(runtime.engine(), payment.id)
        current = [a for a in attempts if a.id == payment.guard_token]
        attempt = current[0] if current else (attempts[-1] if attempts else None)
    attempt_id = attempt.id if attempt is not None else None
    # The callback is checked against what its own attempt was told by UpesiPay, not the payment's latest.
    checked = payment
    if attempt is not None and attempt_id != payment.guard_token:
        checked = payment.model_copy(update={"checkout_request_id": attempt.checkout_request_id})
    mismatch = callback_mismatch(checked, response)
    if mismatch is not None:
        log.warning("callback for payment %s refused: %s does not match the ledger", payment.id, mismatch)
        return JSONResponse({"error": f"{mismatch} does not match the payment"}, status_code=400)
    result_code = int(response["ResultCode"])
    state = state_for_result(result_code)
    receipt = response.get("MpesaReceiptNumber") if result_code == RESULT_SUCCESS else None
    changed = finish(
        payment,
        state,
        attempt_id,
        result_code=result_code,
        result_desc=str(response.get("ResultDesc", ""))[:255],
        receipt=str(receipt)[:64] if receipt else None,
        checkout_request_id=payment.checkout_request_id or str(response.get("CheckoutRequestID", ""))[:100],
        reason=None if state.value == "SUCCEEDED" else f"M-Pesa result {result_code}",
    )
    metrics.record_callback(result_code, changed)
    log.info(
        "callback for payment %s: result %d, %s",
        payment.id,
        result_code,
        "applied" if changed else "duplicate",
    )
    return JSONResponse({"status": "applied" if changed else "duplicate"})
