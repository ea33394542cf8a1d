"""What every API route shares: the API-key check and the public view of a payment (phone masked)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from worker import runtime
from worker.accounts import ACCOUNT_NAME, account_for_api_key, any_account_key
from worker.attempts import attempts_of
from worker.ledger import Payment
from worker.phones import mask_phone


def payment_view(payment: Payment) -> dict[str, Any]:
    return {
        "id": payment.id,
        "account": payment.account,
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


class AccessRefused(Exception):
    """A request the key may not make; answered in the API's problem shape (detail, errors[field, rule])."""

    def __init__(self, status: int, detail: str, field: str, rule: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.rule = status, detail, field, rule


async def access_refused(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, AccessRefused)
    return JSONResponse(
        {"detail": error.detail, "errors": [{"field": error.field, "rule": error.rule}]},
        status_code=error.status,
    )


@dataclass(frozen=True, slots=True)
class ApiCaller:
    """Who an API key speaks for: one account, or (admin) every account and the account routes."""

    account: str | None  # None: admin

    @property
    def admin(self) -> bool:
        return self.account is None

    def account_for(self, requested: str | None) -> str:
        """The account a request acts on: the key's own, or for an admin the one asked for (default: the
        environment's). HTTPException 403 when a scoped key asks for another account."""
        if self.account is None:
            return requested or runtime.settings().upesipay_account
        if requested is not None and requested != self.account:
            raise AccessRefused(
                403,
                "this API key may not act for that account",
                "account",
                "must be the API key's own account",
            )
        return self.account

    def sees(self, account: str) -> bool:
        return self.account is None or self.account == account


ADMIN_MARK = "*"


def parse_api_keys(configured: list[str], default_account: str) -> list[tuple[str, str | None]]:
    """API_KEYS entries as (key, account or None for admin): `key` is the environment's account's, `name:key`
    that account's, `*:key` an admin's (docs/operations.md, "API keys")."""
    parsed: list[tuple[str, str | None]] = []
    for entry in configured:
        scope, sep, key = entry.partition(":")
        if sep and key and (scope == ADMIN_MARK or ACCOUNT_NAME.fullmatch(scope)):
            parsed.append((key, None if scope == ADMIN_MARK else scope))
        else:
            parsed.append((entry, default_account))
    return parsed


def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> ApiCaller:
    settings = runtime.settings()
    keys = parse_api_keys(settings.api_key_list(), settings.upesipay_account)
    presented = (x_api_key or "").encode()
    # Compare against every key without stopping early: the time taken says nothing about which key is close.
    matched: ApiCaller | None = None
    for key, account in keys:
        if hmac.compare_digest(presented, key.encode()) and matched is None:
            matched = ApiCaller(account)
    if matched is not None:
        return matched
    # A stored account's own key (`stkpush account add` / `api-key`), found by its hash.
    stored = account_for_api_key(runtime.engine(), x_api_key or "") if x_api_key else None
    if stored is not None:
        return ApiCaller(stored)
    if not keys and not any_account_key(runtime.engine()):
        raise HTTPException(503, detail="the payments API is disabled: set API_KEYS")
    raise HTTPException(401, detail="missing or wrong X-API-Key")


def require_admin(caller: Annotated[ApiCaller, Depends(require_api_key)]) -> ApiCaller:
    if not caller.admin:
        raise HTTPException(403, detail="this route needs an admin API key (API_KEYS entry `*:key`)")
    return caller


Caller = Annotated[ApiCaller, Depends(require_api_key)]
