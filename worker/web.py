"""The web app: UpesiPay's callback receiver, the payments API, health.

Served by uvicorn (`stkpush web`). The callback answers 200 fast and is idempotent; a forged or mismatching
callback changes nothing and is logged without personal data.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from worker import metrics, runtime
from worker.dashboard import router as dashboard_router
from worker.ledger import Payment, find_by_reference, get_payment, utcnow
from worker.logs import setup_logging
from worker.metrics import router as metrics_router
from worker.migrations import DatabaseNotMigrated, require_migrated
from worker.phones import PhoneNumberError, mask_phone, normalise_phone
from worker.settlement import RESULT_SUCCESS, finish, state_for_result
from worker.signing import signature_matches

log = logging.getLogger("stkpush.web")

MAX_CALLBACK_BYTES = 64 * 1024


def payment_view(payment: Payment) -> dict[str, Any]:
    return {
        "id": payment.id,
        "external_reference": payment.external_reference,
        "state": payment.state.value,
        "amount": payment.amount,
        "phone": mask_phone(payment.phone),
        "reason": payment.reason,
        "receipt": payment.receipt,
        "result_code": payment.result_code,
        "queue": payment.queue,
        "batch_id": payment.batch_id,
        "created_at": payment.created_at.isoformat(),
        "updated_at": payment.updated_at.isoformat(),
        "settled_at": payment.settled_at.isoformat() if payment.settled_at else None,
    }


def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
    keys = runtime.settings().api_key_list()
    if not keys:
        raise HTTPException(503, detail="the payments API is disabled: set API_KEYS")
    presented = (x_api_key or "").encode()
    # Compare against every key without stopping early: the time taken says nothing about which key is close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise HTTPException(401, detail="missing or wrong X-API-Key")


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


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Serving callbacks against a schema the code does not expect could lose them: refuse to start instead.
    try:
        require_migrated(runtime.engine())
    except DatabaseNotMigrated as error:
        log.critical("%s", error)
        raise
    yield


def create_app() -> FastAPI:
    setup_logging(runtime.settings())
    app = FastAPI(
        title="stkpush",
        description="M-Pesa STK push payments through UpesiPay: callbacks, payments API, health.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(metrics_router)
    app.include_router(dashboard_router)

    @app.post("/callbacks/upesipay/{payment_id}/{signature}", include_in_schema=False)
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
            checkout_request_id=payment.checkout_request_id
            or str(response.get("CheckoutRequestID", ""))[:100],
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

    @app.get("/payments/{external_reference}", dependencies=[Depends(require_api_key)])
    def payment_status(external_reference: str) -> dict[str, Any]:
        payment = find_by_reference(runtime.engine(), runtime.settings().upesipay_account, external_reference)
        if payment is None:
            raise HTTPException(404, detail="no payment with that external_reference")
        return payment_view(payment)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            with runtime.engine().connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:
            checks["database"] = f"error: {type(error).__name__}"
        try:
            runtime.redis_client().ping()
            checks["redis"] = "ok"
        except Exception as error:
            checks["redis"] = f"error: {type(error).__name__}"
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", "time": utcnow().isoformat(), **checks},
            status_code=200 if healthy else 503,
        )

    from worker.api import router as api_router

    app.include_router(api_router)
    return app
