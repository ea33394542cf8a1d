"""Delivering events: release a due delivery (lease it, queue `stkpush.webhooks.deliver`), then POST it signed,
record the attempt, and schedule the retry or disable an endpoint that has failed for days.

Deliveries wait in the ledger (`next_attempt_at`), never as long Celery countdowns: kombu's Redis transport
redelivers an ETA message that outlives `visibility_timeout`, and a retry schedule of days would outlive it.
A release hands the message a fresh `lease_token`; only the message carrying it may claim the delivery, so a
duplicate message does nothing, and a worker that dies mid-delivery leaves a lease that runs out, after which beat
releases the delivery again (at least once; the receiver drops duplicates by event id).

Order per payment: a delivery is released only when no earlier event of the same payment is still PENDING for
the same target, so a receiver never hears `payment.succeeded_after_failure` before `payment.expired`.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import time
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import httpx
from sqlalchemy import and_, exists, or_, update
from sqlalchemy.orm import aliased
from sqlmodel import col, select

from worker import metrics, runtime
from worker.events import Event
from worker.ledger import session_scope, utcnow
from worker.settings import Settings
from worker.webhooks.signature import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header
from worker.webhooks.store import (
    HOOK_TARGET,
    DeliveryState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)

log = logging.getLogger("stkpush.webhooks")

DELIVER_TASK = "stkpush.webhooks.deliver"
WEBHOOKS_QUEUE = "webhooks"
TICK_LIMIT = 500
USER_AGENT = "stkpush-webhooks/1"


def lease_s(settings: Settings) -> float:
    return settings.webhook_lease_s


def retry_delay_s(settings: Settings, attempts: int) -> float:
    """Exponential, capped, half of it random: receivers that failed together do not all return together."""
    delay = float(
        min(settings.webhook_retry_cap_s, settings.webhook_retry_base_s * 2 ** max(attempts - 1, 0))
    )
    return delay / 2 + random.uniform(0, delay / 2)


def _releasable(now: datetime) -> Any:
    earlier = aliased(WebhookDelivery)
    enabled = select(col(WebhookEndpoint.id)).where(col(WebhookEndpoint.enabled).is_(True))
    return and_(
        col(WebhookDelivery.state) == DeliveryState.PENDING,
        col(WebhookDelivery.next_attempt_at) <= now,
        or_(col(WebhookDelivery.lease_until).is_(None), col(WebhookDelivery.lease_until) <= now),
        or_(col(WebhookDelivery.endpoint_id) == HOOK_TARGET, col(WebhookDelivery.endpoint_id).in_(enabled)),
        ~exists().where(
            col(earlier.endpoint_id) == col(WebhookDelivery.endpoint_id),
            col(earlier.payment_id) == col(WebhookDelivery.payment_id),
            col(earlier.state) == DeliveryState.PENDING,
            col(earlier.event_seq) < col(WebhookDelivery.event_seq),
        ),
    )


def release(delivery_id: int) -> bool:
    """Lease one due delivery and queue its message; False when it is not due, leased, or behind another."""
    settings = runtime.settings()
    now = utcnow()
    token = secrets.token_hex(16)
    with runtime.engine().begin() as connection:
        moved = connection.execute(
            update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery_id, _releasable(now))
            .values(lease_token=token, lease_until=now + timedelta(seconds=lease_s(settings)))
        ).rowcount
    if moved != 1:
        return False
    from worker.celery_app import app

    try:
        app.send_task(DELIVER_TASK, args=[delivery_id, token], queue=WEBHOOKS_QUEUE, retry=False)
    except Exception as error:  # the lease runs out and beat releases it again
        log.warning("webhook delivery %d not queued (%s)", delivery_id, type(error).__name__)
        return False
    return True


def release_due(limit: int = TICK_LIMIT) -> int:
    """Beat's tick: release every due delivery (first retries, deliveries whose worker died, ones left behind)."""
    now = utcnow()
    with session_scope(runtime.engine()) as session:
        ids = session.exec(
            select(WebhookDelivery.id)
            .where(_releasable(now))
            .order_by(col(WebhookDelivery.next_attempt_at), col(WebhookDelivery.event_seq))
            .limit(limit)
        ).all()
    return sum(release(delivery_id) for delivery_id in ids if delivery_id is not None)


@lru_cache(maxsize=1)
def _http() -> httpx.Client:
    # One pooled client per process: keep-alive to the merchant's receiver; never follow redirects (a 3xx is a
    # misconfigured endpoint, and following it could post the payload somewhere the merchant did not name).
    return httpx.Client(timeout=runtime.settings().webhook_timeout_s, follow_redirects=False)


def _claim(delivery_id: int, token: str) -> tuple[WebhookDelivery, Event, WebhookEndpoint | None] | None:
    settings = runtime.settings()
    now = utcnow()
    claimed = secrets.token_hex(16)
    with runtime.engine().begin() as connection:
        moved = connection.execute(
            update(WebhookDelivery)
            .where(
                col(WebhookDelivery.id) == delivery_id,
                col(WebhookDelivery.state) == DeliveryState.PENDING,
                col(WebhookDelivery.lease_token) == token,
            )
            .values(lease_token=claimed, lease_until=now + timedelta(seconds=lease_s(settings)))
        ).rowcount
    if moved != 1:
        return None
    with session_scope(runtime.engine()) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        assert delivery is not None
        event = session.exec(select(Event).where(col(Event.seq) == delivery.event_seq)).one()
        endpoint = session.get(WebhookEndpoint, delivery.endpoint_id)
    return delivery, event, endpoint


def deliver(delivery_id: int, token: str) -> str:
    """Run one leased delivery; returns what happened (for logs and tests)."""
    claimed = _claim(delivery_id, token)
    if claimed is None:
        return "not-leased"  # a duplicate message, or beat released it again after the lease ran out
    delivery, event, endpoint = claimed
    settings = runtime.settings()
    started = time.monotonic()
    status_code: int | None = None
    error: str | None = None
    if delivery.endpoint_id == HOOK_TARGET:
        ok, error = _publish_hook(settings, event)
    elif endpoint is None or not endpoint.enabled:
        _drop_lease(delivery)
        return "endpoint-disabled"
    else:
        body = event.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: event.id,
            SIGNATURE_HEADER: signature_header(endpoint.secret, int(time.time()), body),
        }
        try:
            answer = _http().post(endpoint.url, content=body, headers=headers)
            status_code = answer.status_code
            ok = 200 <= status_code < 300
            error = None if ok else f"HTTP {status_code}"
        except httpx.TimeoutException:
            ok, error = False, "timeout"
        except httpx.HTTPError as failure:
            ok, error = False, type(failure).__name__
    duration_ms = int((time.monotonic() - started) * 1000)
    return _record(delivery, event, ok, status_code, error, duration_ms)


def _publish_hook(settings: Settings, event: Event) -> tuple[bool, str | None]:
    from worker.celery_app import app

    try:
        app.send_task(
            settings.stkpush_on_outcome_task,
            args=[json.loads(event.payload)],
            queue=settings.stkpush_on_outcome_queue,
            retry=False,
        )
    except Exception as failure:
        return False, type(failure).__name__
    return True, None


def _drop_lease(delivery: WebhookDelivery) -> None:
    with runtime.engine().begin() as connection:
        connection.execute(
            update(WebhookDelivery)
            .where(col(WebhookDelivery.id) == delivery.id)
            .values(lease_token=None, lease_until=None)
        )


def _record(
    delivery: WebhookDelivery,
    event: Event,
    ok: bool,
    status_code: int | None,
    error: str | None,
    duration_ms: int,
) -> str:
    settings = runtime.settings()
    now = utcnow()
    attempts = delivery.attempts + 1
    if ok:
        result, values = "delivered", {"state": DeliveryState.DELIVERED, "delivered_at": now}
    elif now - delivery.created_at >= timedelta(seconds=settings.webhook_retry_for_s):
        result, values = "gave-up", {"state": DeliveryState.GAVE_UP}
    else:
        wait = timedelta(seconds=retry_delay_s(settings, attempts))
        result, values = "retry", {"next_attempt_at": now + wait}
    disabled = False
    with runtime.engine().begin() as connection:
        connection.execute(
            update(WebhookDelivery)
            .where(
                col(WebhookDelivery.id) == delivery.id,
                col(WebhookDelivery.lease_token) == delivery.lease_token,
            )
            .values(
                attempts=attempts,
                last_status_code=status_code,
                last_error=error,
                lease_token=None,
                lease_until=None,
                **values,
            )
        )
        connection.execute(
            WebhookAttempt.__table__.insert().values(  # type: ignore[attr-defined]
                delivery_id=delivery.id,
                endpoint_id=delivery.endpoint_id,
                attempted_at=now,
                status_code=status_code,
                error=error,
                duration_ms=duration_ms,
            )
        )
        if delivery.endpoint_id != HOOK_TARGET:
            disabled = _note_endpoint_health(connection, delivery.endpoint_id, ok, now, settings)
    metrics.record_webhook_delivery(result)
    if disabled:
        metrics.record_webhook_endpoint_disabled()
        log.error(
            "WEBHOOK ENDPOINT DISABLED: %s has failed every delivery for over %ds; its deliveries wait in the "
            "ledger: fix the receiver, then `stkpush webhook enable %s`",
            delivery.endpoint_id,
            settings.webhook_disable_after_s,
            delivery.endpoint_id,
        )
    log.info(
        "webhook delivery %d (event %s to %s): %s%s",
        delivery.id,
        event.id,
        delivery.endpoint_id,
        result,
        f" ({error})" if error else "",
    )
    if ok and delivery.payment_id is not None:
        _release_next_of_payment(delivery)
    return result


def _note_endpoint_health(
    connection: Any, endpoint_id: str, ok: bool, now: datetime, settings: Settings
) -> bool:
    """Track the endpoint's run of failures; True when this attempt disabled it."""
    endpoint = col(WebhookEndpoint.id) == endpoint_id
    if ok:
        connection.execute(update(WebhookEndpoint).where(endpoint).values(failing_since=None))
        return False
    connection.execute(
        update(WebhookEndpoint)
        .where(endpoint, col(WebhookEndpoint.failing_since).is_(None))
        .values(failing_since=now)
    )
    cutoff = now - timedelta(seconds=settings.webhook_disable_after_s)
    moved = connection.execute(
        update(WebhookEndpoint)
        .where(endpoint, col(WebhookEndpoint.enabled).is_(True), col(WebhookEndpoint.failing_since) <= cutoff)
        .values(
            enabled=False, disabled_reason=f"failed every delivery for {settings.webhook_disable_after_s}s"
        )
    ).rowcount
    return bool(moved == 1)


def _release_next_of_payment(delivery: WebhookDelivery) -> None:
    with session_scope(runtime.engine()) as session:
        following = session.exec(
            select(WebhookDelivery.id)
            .where(
                col(WebhookDelivery.endpoint_id) == delivery.endpoint_id,
                col(WebhookDelivery.payment_id) == delivery.payment_id,
                col(WebhookDelivery.state) == DeliveryState.PENDING,
                col(WebhookDelivery.event_seq) > delivery.event_seq,
            )
            .order_by(col(WebhookDelivery.event_seq))
            .limit(1)
        ).first()
    if following is not None:
        release(following)
