"""UpesiPay's callback receiver: `POST /callbacks/upesipay/{payment id}/{signature}`.

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
from worker.ledger import Payment, get_payment
from worker.phones import PhoneNumberError, normalise_phone
from worker.settlement import RESULT_SUCCESS, finish, state_for_result
from worker.signing import signature_matches

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


@router.post("/callbacks/upesipay/{payment_id}/{signature}", include_in_schema=False)
async def upesipay_callback(payment_id: str, signature: str, request: Request) -> JSONResponse:
    settings = runtime.settings()
    if not signature_matches(settings.callback_secret.get_secret_value(), payment_id, signature):
        log.warning("callback with a bad signature refused (payment id %.12s)", payment_id)
        return JSONResponse({"error": "forbidden"}, status_code=403)
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
    mismatch = callback_mismatch(payment, response)
    if mismatch is not None:
        log.warning("callback for payment %s refused: %s does not match the ledger", payment.id, mismatch)
        return JSONResponse({"error": f"{mismatch} does not match the payment"}, status_code=400)
    result_code = int(response["ResultCode"])
    state = state_for_result(result_code)
    receipt = response.get("MpesaReceiptNumber") if result_code == RESULT_SUCCESS else None
    changed = finish(
        payment,
        state,
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
