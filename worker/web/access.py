"""What every API route shares: the API-key check and the public view of a payment (phone masked)."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Header, HTTPException

from worker import runtime
from worker.ledger import Payment
from worker.phones import mask_phone


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
        "expires_at": payment.expires_at.isoformat() if payment.expires_at else None,
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
