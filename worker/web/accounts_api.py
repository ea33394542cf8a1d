"""The accounts API, for admin keys only (API_KEYS entry `*:key`): list, add, change and disable the UpesiPay
accounts of a deployment (worker/accounts.py). Tokens go in, never out: no answer, log or error carries one."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from worker import runtime
from worker.accounts import (
    LIMIT_FIELDS,
    AccountError,
    UnknownAccount,
    add_account,
    list_accounts,
    new_api_key,
    update_account,
)
from worker.web.access import require_admin

router = APIRouter(tags=["accounts"], dependencies=[Depends(require_admin)])

MAX_ACCOUNT_BYTES = 8 * 1024


class AccountIn(BaseModel):
    """POST /accounts (documentation; the body is checked by worker.accounts)."""

    name: str = Field(description="1-64 of A-Z a-z 0-9 _ . -")
    channel_ids: list[int] = Field(description="UpesiPay channel ids; the first is the default")
    token: str = Field(description="The account's UpesiPay token: stored encrypted, never shown again")
    phone_streak_limit: int | None = Field(default=None, description="at most 10; default: the setting")
    account_failure_limit: int | None = Field(default=None, description="at most 50; default: the setting")
    interactive_reserve: int | None = None
    bulk_max_inflight: int | None = None


def _problem(error: AccountError) -> JSONResponse:
    status = 404 if isinstance(error, UnknownAccount) else 422
    return JSONResponse(
        {"detail": "invalid account request", "errors": [{"field": error.field, "rule": error.rule}]},
        status_code=status,
    )


async def _body(request: Request) -> dict[str, Any] | JSONResponse:
    body = await request.body()
    if len(body) > MAX_ACCOUNT_BYTES:
        rule = f"must be at most {MAX_ACCOUNT_BYTES} bytes"
        return JSONResponse({"detail": "body too large", "errors": [{"field": "body", "rule": rule}]}, 413)
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        document = None
    if not isinstance(document, dict):
        rule = "must be a JSON object"
        return JSONResponse(
            {"detail": "invalid account request", "errors": [{"field": "body", "rule": rule}]}, 422
        )
    return document


def _limits(document: dict[str, Any]) -> dict[str, Any]:
    return {name: document[name] for name in LIMIT_FIELDS if name in document}


@router.get("/accounts", summary="Every account (the environment's first); tokens are never shown")
def get_accounts() -> list[dict[str, Any]]:
    return list_accounts(runtime.engine(), runtime.settings())


@router.post(
    "/accounts",
    status_code=201,
    summary="Add a merchant's UpesiPay account",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": AccountIn.model_json_schema()}},
        }
    },
)
async def post_account(request: Request) -> JSONResponse:
    document = await _body(request)
    if isinstance(document, JSONResponse):
        return document
    unknown = sorted(set(document) - {"name", "channel_ids", "token", *LIMIT_FIELDS})
    if unknown:
        return _problem(AccountError(unknown[0][:64], "is not a known field"))
    try:
        view = await run_in_threadpool(
            lambda: add_account(
                runtime.engine(),
                runtime.settings(),
                # Any JSON value: add_account checks each and names the field it refuses.
                document.get("name"),
                document.get("channel_ids"),
                document.get("token"),
                _limits(document),
            )
        )
        # The account's own API key, in this answer only (its hash is stored).
        view["api_key"] = await run_in_threadpool(
            lambda: new_api_key(runtime.engine(), runtime.settings(), view["name"])
        )
    except AccountError as error:
        return _problem(error)
    return JSONResponse(view, status_code=201)


@router.patch(
    "/accounts/{name}", summary="Change an account: channels, token, limits (null: the setting), disabled"
)
async def patch_account(name: str, request: Request) -> JSONResponse:
    document = await _body(request)
    if isinstance(document, JSONResponse):
        return document
    unknown = sorted(set(document) - {"channel_ids", "token", "disabled", *LIMIT_FIELDS})
    if unknown:
        return _problem(AccountError(unknown[0][:64], "is not a known field"))
    disabled = document.get("disabled")
    if disabled is not None and not isinstance(disabled, bool):
        return _problem(AccountError("disabled", "must be true or false"))
    token = document.get("token")
    if "token" in document and not isinstance(token, str):
        return _problem(AccountError("token", "must be 1-512 printable ASCII characters without spaces"))
    try:
        view = await run_in_threadpool(
            lambda: update_account(
                runtime.engine(),
                runtime.settings(),
                name,
                channel_ids=document.get("channel_ids"),
                token=token,
                limits=_limits(document),
                disabled=disabled,
            )
        )
    except AccountError as error:
        return _problem(error)
    return JSONResponse(view)
