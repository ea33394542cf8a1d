"""The producer HTTP API: POST /payments (one payment), POST /batches (a bulk invoice file), GET /batches/{id}.

Every route needs an `X-API-Key` (one of API_KEYS, compared in constant time); without one the request is refused
with 401 before its body is read, and nothing changes. A key is one account's (worker/web/access.py): it creates
and sees that account's payments and batches only (403 creating for another account, 404 reading another's); an
admin key names the account with `account` (body) or `?account=` (default: the environment's). Validation
errors are 422 and name every bad field with its rule, in one shape:
{"detail": ..., "errors": [{"field": ..., "rule": ...}]}.

POST /batches answers 202 with the batch id as soon as the upload is stored; ingestion then runs in this web
process, on one background thread (batches are ingested one after another; a waiting batch shows INGESTING with
no rows yet). It is not handed to a Celery task: the stored upload is on this machine's disk, and a long ingestion
would hold up the maintenance queue (dispatcher, settlement). If the web process stops mid-ingestion the batch
stays INGESTING: upload the same file again, which records nothing twice.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from producers.batch import (
    FileFormat,
    batch_status,
    format_for_media_type,
    format_for_name,
    ingest_batch,
    iter_rejects,
    open_batch,
)
from producers.enqueue import PaymentConflictError, enqueue_payment
from producers.validation import PaymentValidationError, expires_in_error, validate_payment
from worker import batch_brake, reprompts, runtime
from worker.ledger import TERMINAL_STATES, Payment, find_by_reference, get_payment
from worker.web.access import Caller, history_view, payment_view, require_api_key
from worker.web.waiting import wait_for_outcome

log = logging.getLogger("stkpush.api")

AccountQuery = Annotated[
    str | None,
    Query(
        max_length=64, description="Admin keys: the account (default: the environment's); others: their own"
    ),
]


# Uploads and rejects files live here (per machine): the web process stores an upload, ingests it, deletes it.
def batch_dir() -> Path:
    configured = runtime.settings().batch_dir
    return Path(configured) if configured else Path(tempfile.gettempdir()) / "stkpush-batches"


# A batch file of a million rows is ~60 MB; anything far beyond that is a mistake or an attack.
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
MAX_PAYMENT_BYTES = 16 * 1024
# How many rejects GET /batches/{id} shows inline; the whole list is at /batches/{id}/rejects.
REJECTS_SHOWN = 100
# One ingestion at a time: two would only contend for the database's write lock (SQLite) and the broker.
INGEST_THREADS = 1


class FieldProblem(BaseModel):
    field: str
    rule: str


class RejectRow(BaseModel):
    line: int
    field: str
    rule: str


class ValidationProblem(BaseModel):
    detail: str
    errors: list[FieldProblem]


class PaymentIn(BaseModel):
    """The request body of POST /payments (documentation; the body is checked by the one payment schema)."""

    amount: int = Field(description="Whole shillings, within AMOUNT_MIN..AMOUNT_MAX (no floats, no strings)")
    phone_number: str = Field(
        description="Kenyan mobile number in any common form: 07.., 01.., 2547.., +2547.."
    )
    external_reference: str | None = Field(
        default=None,
        description="Your unique reference (generated when absent); makes the request idempotent",
    )
    customer_name: str | None = Field(default=None, max_length=100)
    channel_id: int | None = Field(default=None, description="Default: the account's first channel")
    account: str | None = Field(
        default=None,
        description="The UpesiPay account; default: the API key's (admin keys: the environment's)",
    )
    expires_in: int | None = Field(
        default=None,
        description="Seconds the prompt is worth sending for; not sent by then, the payment ends EXPIRED. "
        "Default: INTERACTIVE_EXPIRES_IN_S",
    )


class PaymentOut(BaseModel):
    id: str
    external_reference: str
    state: str
    amount: int
    phone: str = Field(description="masked")
    reason: str | None
    receipt: str | None
    result_code: int | None
    queue: str
    batch_id: str | None
    created_at: str
    updated_at: str
    settled_at: str | None
    expires_at: str | None = Field(description="the deadline: not sent by then, EXPIRED")
    queued: bool = Field(
        description="a stk_push message is on the broker (false: the dispatcher queues it later)"
    )
    created: bool = Field(description="false when an identical earlier request was found")
    note: str


class Conflict(BaseModel):
    detail: str
    fields: list[str]


class BatchAccepted(BaseModel):
    batch_id: str
    state: str
    status_url: str


class BatchStatus(BaseModel):
    batch_id: str
    source_name: str
    state: str = Field(description="INGESTING, INGESTED, ABORTED (all-or-nothing found bad rows) or FAILED")
    all_or_nothing: bool
    rows_total: int
    rows_recorded: int
    rows_rejected: int
    rows_skipped: int = Field(description="already recorded with the same details")
    rows_conflicting: int = Field(description="reference already used with other details")
    payments_by_state: dict[str, int]
    recorded_not_yet_queued: int
    amount_requested: int
    amount_collected: int = Field(description="sum of SUCCEEDED payments")
    deferred_reasons: dict[str, int] = Field(description="DEFERRED payments counted by why they wait")
    rejects_path: str | None
    error: str | None
    created_at: str
    finished_at: str | None
    paused: bool = Field(description="the batch paused itself; its waiting rows are held until resumed")
    paused_at: str | None
    pause_reason: str | None = Field(description="which trigger fired (worker/batch_brake.py)")
    resumed_at: str | None
    reprompt: int = Field(default=0, description="further prompts a cancelled or unanswered row may get")
    reprompt_after_s: int | None = Field(default=None, description="least seconds between a row's prompts")
    forecast: dict[str, Any] | None = Field(
        default=None,
        description="estimated finish (worker/forecast.py): remaining rows, observed failure rate, budget",
    )
    rejects: list[RejectRow] = Field(
        default_factory=list, description=f"the first {REJECTS_SHOWN} rejects (line, field, rule)"
    )
    rejects_url: str | None = None


UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong X-API-Key; nothing changed"},
    503: {"description": "the API is disabled (API_KEYS is empty)"},
}

router = APIRouter(tags=["producers"], dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED)


def problem(status: int, detail: str, errors: list[dict[str, str]]) -> JSONResponse:
    return JSONResponse({"detail": detail, "errors": errors}, status_code=status)


@router.post(
    "/payments",
    status_code=201,
    summary="Request one payment (idempotent per external_reference)",
    responses={
        200: {"model": PaymentOut, "description": "an identical request was recorded before: that payment"},
        201: {"model": PaymentOut, "description": "recorded and queued (single queue, ahead of batches)"},
        409: {"model": Conflict, "description": "external_reference already used with other details"},
        422: {"model": ValidationProblem, "description": "every bad field, with its rule; nothing recorded"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PaymentIn.model_json_schema()}},
        }
    },
)
async def create_payment(request: Request, caller: Caller) -> JSONResponse:
    body = b""
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_PAYMENT_BYTES:
            rule = f"must be at most {MAX_PAYMENT_BYTES} bytes"
            return problem(413, "body too large", [{"field": "body", "rule": rule}])
    try:
        document = json.loads(body)
    except RecursionError:
        rule = "must not nest objects or lists this deeply"
        return problem(422, "invalid payment request", [{"field": "body", "rule": rule}])
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return problem(422, "invalid payment request", [{"field": "body", "rule": "must be a JSON object"}])
    settings = runtime.settings()
    requested = document.get("account")
    if requested is not None and not isinstance(requested, str):
        return problem(422, "invalid payment request", [{"field": "account", "rule": "must be a string"}])
    account = caller.account_for(requested)
    deadline_error = expires_in_error(document.get("expires_in"))
    try:
        # expires_in and account are the request's, not the payment's: the one schema knows the payment's
        # fields only.
        fields = {name: value for name, value in document.items() if name not in ("expires_in", "account")}
        validate_payment(fields, amount_min=settings.amount_min, amount_max=settings.amount_max)
    except PaymentValidationError as error:
        errors = error.errors + ([deadline_error] if deadline_error else [])
        return problem(422, "invalid payment request", PaymentValidationError(errors).as_dict())
    if deadline_error is not None:
        return problem(422, "invalid payment request", PaymentValidationError([deadline_error]).as_dict())
    try:
        handle = await run_in_threadpool(
            lambda: enqueue_payment(
                amount=document.get("amount"),
                phone_number=document.get("phone_number"),
                external_reference=document.get("external_reference"),
                customer_name=document.get("customer_name"),
                channel_id=document.get("channel_id"),
                queue="single",
                expires_in=document.get("expires_in"),
                account=account,
            )
        )
    except PaymentValidationError as error:
        return problem(422, "invalid payment request", error.as_dict())
    except PaymentConflictError as error:
        return JSONResponse({"detail": str(error), "fields": error.fields}, status_code=409)
    payment = await run_in_threadpool(get_payment, runtime.engine(), handle.id)
    assert payment is not None
    view = {**payment_view(payment), "queued": handle.queued, "created": handle.created, "note": handle.note}
    return JSONResponse(view, status_code=201 if handle.created else 200)


def _ingest_upload(upload: Path, batch_id: str, file_format: FileFormat, all_or_nothing: bool) -> None:
    try:
        ingest_batch(
            upload,
            file_format=file_format,
            batch_id=batch_id,
            all_or_nothing=all_or_nothing,
            rejects_path=batch_dir() / f"{batch_id}.rejects.csv",
        )
    except Exception as error:  # ingest_batch records its own failures; this is the thread's last word
        log.error("batch %s: ingestion thread stopped: %s", batch_id, type(error).__name__)
    finally:
        upload.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def _ingestion_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=INGEST_THREADS, thread_name_prefix="stkpush-batch")


@router.post(
    "/batches",
    status_code=202,
    summary="Upload a bulk invoice file (CSV or JSON Lines); answered at once, ingested in the background",
    responses={
        202: {"model": BatchAccepted, "description": "stored; follow status_url for its progress"},
        413: {"model": ValidationProblem, "description": f"larger than {MAX_UPLOAD_BYTES} bytes"},
        422: {"model": ValidationProblem, "description": "empty body, or the format can't be told"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The file itself as the body. CSV: a header row with external_reference, "
            "phone_number, amount (digits only) and optionally customer_name, channel_id. JSON Lines: one "
            "payment object per line, fields as in POST /payments.",
            "content": {
                "text/csv": {"schema": {"type": "string", "format": "binary"}},
                "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def create_batch(
    request: Request,
    caller: Caller,
    file_format: Annotated[
        FileFormat | None, Query(alias="format", description="Default: from Content-Type, then from name")
    ] = None,
    name: Annotated[str, Query(max_length=255, description="The file's name, shown to operators")] = "upload",
    all_or_nothing: Annotated[bool, Query(description="Record nothing if any row is bad")] = False,
    reprompt: Annotated[
        str | None, Query(description="Further prompts (0 to 5) for a cancelled or unanswered prompt")
    ] = None,
    reprompt_after: Annotated[
        str | None, Query(description="With reprompt: least time between prompts, e.g. 4h, 30m, 90s")
    ] = None,
    account: AccountQuery = None,
) -> JSONResponse:
    chosen = caller.account_for(account)
    try:
        count = int(reprompt) if reprompt is not None and reprompt.strip().isdigit() else None
        if reprompt is not None and count is None:
            raise reprompts.RepromptError(
                "reprompt", f"must be a whole number from 0 to {reprompts.MAX_REPROMPTS}"
            )
        after_s = reprompts.parse_after(reprompt_after) if reprompt_after is not None else None
        reprompt_max, reprompt_after_s = reprompts.check(count or 0, after_s)
    except reprompts.RepromptError as error:
        return problem(422, "invalid re-prompt options", [{"field": error.field, "rule": error.rule}])
    fmt = file_format or format_for_media_type(request.headers.get("content-type")) or format_for_name(name)
    if fmt is None:
        rule = "give ?format=csv or jsonl, a Content-Type of text/csv or application/x-ndjson, or a name ending .csv"
        return problem(422, "unknown file format", [{"field": "format", "rule": rule}])
    await anyio.to_thread.run_sync(lambda: batch_dir().mkdir(parents=True, exist_ok=True))
    upload = batch_dir() / f"{secrets.token_hex(16)}.upload"
    size = 0
    try:
        async with await anyio.open_file(upload, "wb") as spool:
            async for piece in request.stream():
                size += len(piece)
                if size > MAX_UPLOAD_BYTES:
                    break
                await spool.write(piece)
        if size > MAX_UPLOAD_BYTES:
            raise _Refused(413, "upload too large", "body", f"must be at most {MAX_UPLOAD_BYTES} bytes")
        if size == 0:
            raise _Refused(422, "empty upload", "body", "is empty: send the file as the request body")
    except _Refused as refused:
        upload.unlink(missing_ok=True)
        return problem(refused.status, refused.detail, [{"field": refused.field, "rule": refused.rule}])
    except BaseException:
        upload.unlink(missing_ok=True)
        raise
    try:
        batch_id = await run_in_threadpool(
            lambda: open_batch(
                name,
                all_or_nothing=all_or_nothing,
                account=chosen,
                reprompt=reprompt_max,
                reprompt_after_s=reprompt_after_s,
            )
        )
    except PaymentValidationError as error:
        upload.unlink(missing_ok=True)
        return problem(422, "invalid batch", error.as_dict())
    _ingestion_pool().submit(_ingest_upload, upload, batch_id, fmt, all_or_nothing)
    status_url = f"/batches/{batch_id}"
    return JSONResponse(
        {"batch_id": batch_id, "state": "INGESTING", "status_url": status_url},
        status_code=202,
        headers={"Location": status_url},
    )


class _Refused(Exception):
    def __init__(self, status: int, detail: str, field: str, rule: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.rule = status, detail, field, rule


@router.get(
    "/batches/{batch_id}",
    response_model=BatchStatus,
    summary="A batch: rows, payments by state, money requested and collected, why payments wait",
    responses={404: {"description": "no such batch"}},
)
def get_batch(batch_id: str, caller: Caller, account: AccountQuery = None) -> dict[str, Any]:
    status = batch_status(batch_id, caller.account_for(account))
    if status is None:
        raise HTTPException(404, detail="no batch with that id")
    if status["rejects_path"] and Path(status["rejects_path"]).is_file():
        status["rejects_url"] = f"/batches/{batch_id}/rejects"
        if status["state"] != "INGESTING":  # while ingesting, the file's last row may be half written
            status["rejects"] = list(iter_rejects(status["rejects_path"], REJECTS_SHOWN))
    return status


@router.post(
    "/batches/{batch_id}/resume",
    summary="Resume a batch that paused itself: its held rows are released within the bulk lane",
    responses={404: {"description": "no such batch"}, 409: {"description": "the batch is not paused"}},
)
def resume_batch(batch_id: str, caller: Caller, account: AccountQuery = None) -> dict[str, Any]:
    if batch_status(batch_id, caller.account_for(account)) is None:
        raise HTTPException(404, detail="no batch with that id")
    released = batch_brake.resume(batch_id)
    if released is None:
        raise HTTPException(409, detail="the batch is not paused")
    return {"batch_id": batch_id, "resumed": True, "released": released}


@router.get(
    "/batches/{batch_id}/rejects",
    summary="A batch's rejects file (CSV: line, field, rule)",
    response_class=FileResponse,
    responses={200: {"content": {"text/csv": {}}}, 404: {"description": "no such batch, or no bad rows"}},
)
def get_batch_rejects(batch_id: str, caller: Caller, account: AccountQuery = None) -> FileResponse:
    status = batch_status(batch_id, caller.account_for(account))
    if status is None or not status["rejects_path"] or not Path(status["rejects_path"]).is_file():
        raise HTTPException(404, detail="no rejects for that batch")
    return FileResponse(status["rejects_path"], media_type="text/csv", filename=f"{batch_id}.rejects.csv")


@router.get(
    "/payments/{external_reference}",
    summary="One payment by its external_reference (phone masked); ?wait=N holds until it settles",
    responses={
        404: {"description": "no such payment"},
        422: {"model": ValidationProblem, "description": "wait out of range"},
    },
)
async def payment_status(
    external_reference: str,
    caller: Caller,
    wait: Annotated[
        str | None,
        Query(
            description="Seconds to hold the request while the payment is in flight (0..PAYMENT_WAIT_MAX_S)"
        ),
    ] = None,
    account: AccountQuery = None,
) -> JSONResponse:
    settings = runtime.settings()
    chosen = caller.account_for(account)
    wait_s = 0
    if wait is not None:
        rule = f"must be a whole number of seconds from 0 to {settings.payment_wait_max_s}"
        if not wait.isdigit() or int(wait) > settings.payment_wait_max_s:
            return problem(422, "invalid wait", [{"field": "wait", "rule": rule}])
        wait_s = int(wait)

    def read() -> Payment | None:
        return find_by_reference(runtime.engine(), chosen, external_reference)

    payment = await run_in_threadpool(read)
    if payment is None:
        return JSONResponse({"detail": "no payment with that external_reference"}, status_code=404)
    if wait_s and payment.state not in TERMINAL_STATES:
        payment = await wait_for_outcome(external_reference, wait_s, read) or payment
    return JSONResponse(history_view(payment))


@router.post(
    "/payments/{ref}/retry",
    summary="Re-open a FAILED payment that provably never reached UpesiPay (ref: external_reference or id)",
    responses={
        404: {"description": "no such payment"},
        409: {
            "description": "refused: the payment is not FAILED, or it may have reached UpesiPay (detail says)"
        },
    },
)
async def retry_payment(ref: str, caller: Caller, account: AccountQuery = None) -> JSONResponse:
    from worker import retry

    chosen = caller.account_for(account)
    answer = await run_in_threadpool(lambda: retry.retry_payment(ref, "api", chosen))
    if answer is None:
        return JSONResponse({"detail": "no payment with that external_reference or id"}, status_code=404)
    view = retry.reopen_view(answer)
    if answer.refusal is not None:
        return JSONResponse({**view, "detail": f"not re-opened: {answer.refusal}"}, status_code=409)
    return JSONResponse(view)
