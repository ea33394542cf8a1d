"""The webhook endpoints API, under the same `X-API-Key` as the payments API (docs/webhooks.md).

POST /webhooks answers the new endpoint with its signing secret, once; nothing else shows the secret.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from worker.web.access import require_api_key
from worker.webhooks.endpoints import (
    WebhookInputError,
    add_endpoint,
    delivery_log,
    endpoint_view,
    get_endpoint,
    list_endpoints,
    set_enabled,
)

MAX_BODY_BYTES = 8 * 1024

router = APIRouter(tags=["webhooks"], dependencies=[Depends(require_api_key)])


def _problem(status: int, field: str, rule: str) -> JSONResponse:
    return JSONResponse(
        {"detail": "invalid webhook request", "errors": [{"field": field, "rule": rule}]}, status_code=status
    )


@router.post("/webhooks", status_code=201, summary="Add an endpoint; the answer holds its secret, shown once")
async def create_webhook(request: Request) -> JSONResponse:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        return _problem(413, "body", f"must be at most {MAX_BODY_BYTES} bytes")
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return _problem(422, "body", 'must be a JSON object: {"url": ..., "events": [...]}')
    unknown = sorted(set(document) - {"url", "events"})
    if unknown:
        return _problem(422, unknown[0], "is not a field of a webhook endpoint (url, events)")
    events = document.get("events")
    if events is not None and not (isinstance(events, list) and all(isinstance(e, str) for e in events)):
        return _problem(422, "events", "must be a list of event type names")
    try:
        created = await run_in_threadpool(add_endpoint, document.get("url"), events)
    except WebhookInputError as error:
        return _problem(422, error.field, error.rule)
    return JSONResponse({**endpoint_view(created.endpoint), "secret": created.secret}, status_code=201)


@router.get("/webhooks", summary="This account's endpoints (no secrets)")
def list_webhooks() -> list[dict[str, Any]]:
    return [endpoint_view(endpoint) for endpoint in list_endpoints()]


def _toggle(endpoint_id: str, enabled: bool) -> JSONResponse:
    try:
        return JSONResponse(endpoint_view(set_enabled(endpoint_id, enabled)))
    except WebhookInputError as error:
        return _problem(404, error.field, error.rule)


@router.post(
    "/webhooks/{endpoint_id}/enable", summary="Deliver again (waiting deliveries go on the next tick)"
)
def enable_webhook(endpoint_id: str) -> JSONResponse:
    return _toggle(endpoint_id, True)


@router.post("/webhooks/{endpoint_id}/disable", summary="Stop delivering; deliveries wait in the ledger")
def disable_webhook(endpoint_id: str) -> JSONResponse:
    return _toggle(endpoint_id, False)


@router.get(
    "/webhooks/{endpoint_id}/deliveries", summary="The delivery log: attempts, status codes, next retry"
)
def webhook_deliveries(endpoint_id: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> JSONResponse:
    if get_endpoint(endpoint_id) is None:
        return _problem(404, "endpoint", "no such endpoint for this account")
    return JSONResponse(delivery_log(endpoint_id, limit))
