"""What every API route shares: the API-key check and the public view of a payment (phone masked)."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Header, HTTPException

from worker import runtime
from worker.attempts import attempts_of
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


def history_view(payment: Payment) -> dict[str, Any]:
    """The payment with its send attempts, oldest first: what each attempt was told and how it ended."""
    attempts = [
        {
            "attempt": attempt.id,
            "number": attempt.number,
            "lane": attempt.lane,
            "claimed_at": attempt.created_at.isoformat(),
            "sent_at": attempt.sent_at.isoformat() if attempt.sent_at else None,
            "provider_reference": attempt.provider_reference,
            "checkout_request_id": attempt.checkout_request_id,
            "outcome": attempt.outcome.value if attempt.outcome else None,
            "outcome_at": attempt.outcome_at.isoformat() if attempt.outcome_at else None,
            "guard_told_at": attempt.guard_resolved_at.isoformat() if attempt.guard_resolved_at else None,
            "current": attempt.id == payment.guard_token,
        }
        for attempt in attempts_of(runtime.engine(), payment.id)
    ]
    return {**payment_view(payment), "attempts": attempts}


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
