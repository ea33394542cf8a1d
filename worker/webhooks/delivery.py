"""Delivering leased events: POST each signed (or send it to the Python hook), record the outcomes, schedule the
retries, and disable an endpoint that has failed for days. Runs in the `stkpush.webhooks.deliver` task.

A message names a few deliveries to one target and the lease token they were released under
(worker.webhooks.release). There is no separate claim: the token is the claim. Celery redelivering the message
after its worker died posts again at once, which is the point; a message of an older lease finds its token
replaced and does nothing. Outcomes are recorded only under the token that was posted, in one transaction per
message; a worker dying before it leaves the deliveries leased until the lease runs out, then they go again.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

import httpx
from sqlalchemy import Connection, bindparam, exists, insert, select, update
from sqlmodel import col

from worker import metrics, runtime
from worker.events import Event
from worker.ledger import utcnow
from worker.settings import Settings
from worker.webhooks.release import release
from worker.webhooks.signature import EVENT_ID_HEADER, SIGNATURE_HEADER, signature_header
from worker.webhooks.store import HOOK_TARGET, DeliveryState, WebhookAttempt, WebhookDelivery, WebhookEndpoint

log = logging.getLogger("stkpush.webhooks")

USER_AGENT = "stkpush-webhooks/1"
# A message starts no new POST after this long: well inside Celery's soft time limit (120 s, worker.celery_app),
# so a message to a slow receiver ends by itself instead of being killed with nothing recorded.
MESSAGE_BUDGET_S = 60.0

_D = WebhookDelivery.__table__.c  # type: ignore[attr-defined]
_E = Event.__table__.c  # type: ignore[attr-defined]
_W = WebhookEndpoint.__table__.c  # type: ignore[attr-defined]
_LATER = WebhookDelivery.__table__.alias("later")  # type: ignore[attr-defined]

_LOAD = (
    select(
        _D.id,
        _D.endpoint_id,
        _D.payment_id,
        _D.attempts,
        _D.created_at,
        _E.id.label("event_id"),
        _E.payload,
        _W.url,
        _W.secret,
        _W.enabled,
        _W.failing_since,
        exists()
        .where(
            _LATER.c.endpoint_id == _D.endpoint_id,
            _LATER.c.payment_id == _D.payment_id,
            _LATER.c.state == DeliveryState.PENDING,
            _LATER.c.event_seq > _D.event_seq,
        )
        .label("has_following"),
    )
    .select_from(
        WebhookDelivery.__table__.join(Event.__table__, _E.seq == _D.event_seq).outerjoin(  # type: ignore[attr-defined]
            WebhookEndpoint.__table__,  # type: ignore[attr-defined]
            _W.id == _D.endpoint_id,
        )
    )
    .where(
        _D.id.in_(bindparam("ids", expanding=True)),
        _D.state == DeliveryState.PENDING,
        _D.lease_token == bindparam("token"),
    )
    .order_by(_D.next_attempt_at, _D.event_seq)
)
_RECORD = (
    update(WebhookDelivery.__table__)  # type: ignore[attr-defined]
    .where(_D.id == bindparam("delivery_id"), _D.lease_token == bindparam("token"))
    .values(
        attempts=bindparam("attempts"),
        last_status_code=bindparam("status_code"),
        last_error=bindparam("error"),
        state=bindparam("new_state"),
        next_attempt_at=bindparam("next_at"),
        delivered_at=bindparam("delivered"),
        lease_token=None,
        lease_until=None,
    )
)
_UNLEASE = (
    update(WebhookDelivery.__table__)  # type: ignore[attr-defined]
    .where(_D.id == bindparam("delivery_id"), _D.lease_token == bindparam("token"))
    .values(lease_token=None, lease_until=None)
)
_NEXT_OF_PAYMENT = (
    select(_D.id)
    .where(
        _D.endpoint_id == bindparam("endpoint_id"),
        _D.payment_id == bindparam("payment_id"),
        _D.state == DeliveryState.PENDING,
        _D.id != bindparam("delivery_id"),
    )
    .order_by(_D.event_seq)
    .limit(1)
)


def retry_delay_s(settings: Settings, attempts: int) -> float:
    """Exponential, capped, half of it random: receivers that failed together do not all return together."""
    delay = float(
        min(settings.webhook_retry_cap_s, settings.webhook_retry_base_s * 2 ** max(attempts - 1, 0))
    )
    return delay / 2 + random.uniform(0, delay / 2)


@dataclass(frozen=True)
class Leased:
    delivery_id: int
    endpoint_id: str
    payment_id: str | None
    attempts: int
    created_at: datetime
    event_id: str
    payload: str
    url: str | None
    secret: str | None
    enabled: bool
    failing_since: datetime | None
    has_following: bool  # a later event of the same payment waits behind this one for the same target


@dataclass(frozen=True)
class Attempt:
    leased: Leased
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int


@lru_cache(maxsize=1)
def _http() -> httpx.Client:
    # One pooled client per process: keep-alive to the merchant's receiver; never follow redirects (a 3xx is a
    # misconfigured endpoint, and following it could post the payload somewhere the merchant did not name).
    return httpx.Client(timeout=runtime.settings().webhook_timeout_s, follow_redirects=False)


def _load(delivery_ids: list[int], token: str) -> list[Leased]:
    with runtime.engine().connect() as connection:
        rows = connection.execute(_LOAD, {"ids": delivery_ids, "token": token}).all()
    return [
        Leased(
            delivery_id=int(row.id),
            endpoint_id=row.endpoint_id,
            payment_id=row.payment_id,
            attempts=row.attempts,
            created_at=row.created_at,
            event_id=row.event_id,
            payload=row.payload,
            url=row.url,
            secret=row.secret,
            enabled=bool(row.enabled),
            failing_since=row.failing_since,
            has_following=bool(row.has_following),
        )
        for row in rows
    ]


def deliver(delivery_ids: list[int], token: str) -> dict[str, int]:
    """Attempt the leased deliveries in order; stop at the first failure (the target is down: the rest go back
    to waiting, due, for the next tick) or when half the lease (at most MESSAGE_BUDGET_S) is gone. Returns counts
    by result."""
    settings = runtime.settings()
    stop_at = time.monotonic() + min(settings.webhook_lease_s / 2, MESSAGE_BUDGET_S)
    leased = _load(delivery_ids, token)
    attempts: list[Attempt] = []
    for delivery in leased:
        if time.monotonic() > stop_at or (delivery.endpoint_id != HOOK_TARGET and not delivery.enabled):
            break
        attempt = _attempt(settings, delivery)
        attempts.append(attempt)
        if not attempt.ok:
            break
    untouched = leased[len(attempts) :]
    return _record(settings, token, attempts, untouched)


def _attempt(settings: Settings, delivery: Leased) -> Attempt:
    started = time.monotonic()
    status_code: int | None = None
    if delivery.endpoint_id == HOOK_TARGET:
        ok, error = _publish_hook(settings, delivery.payload)
    elif delivery.url is None or delivery.secret is None:
        ok, error = False, "endpoint removed"
    else:
        body = delivery.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: delivery.event_id,
            SIGNATURE_HEADER: signature_header(delivery.secret, int(time.time()), body),
        }
        try:
            answer = _http().post(delivery.url, content=body, headers=headers)
            status_code = answer.status_code
            ok = 200 <= status_code < 300
            error = None if ok else f"HTTP {status_code}"
        except httpx.TimeoutException:
            ok, error = False, "timeout"
        except httpx.HTTPError as failure:
            ok, error = False, type(failure).__name__
    return Attempt(delivery, ok, status_code, error, int((time.monotonic() - started) * 1000))


def _publish_hook(settings: Settings, payload: str) -> tuple[bool, str | None]:
    from worker.celery_app import app

    try:
        app.send_task(
            settings.stkpush_on_outcome_task,
            args=[json.loads(payload)],
            queue=settings.stkpush_on_outcome_queue,
            retry=False,
        )
    except Exception as failure:
        return False, type(failure).__name__
    return True, None


def _record(
    settings: Settings, token: str, attempts: list[Attempt], untouched: list[Leased]
) -> dict[str, int]:
    now = utcnow()
    counts: dict[str, int] = {}
    updates, failures = [], []
    for attempt in attempts:
        delivery = attempt.leased
        tries = delivery.attempts + 1
        state, next_at, delivered = DeliveryState.PENDING, now, None
        if attempt.ok:
            result, state, delivered = "delivered", DeliveryState.DELIVERED, now
        elif now - delivery.created_at >= timedelta(seconds=settings.webhook_retry_for_s):
            result, state = "gave-up", DeliveryState.GAVE_UP
        else:
            result, next_at = "retry", now + timedelta(seconds=retry_delay_s(settings, tries))
        counts[result] = counts.get(result, 0) + 1
        updates.append(
            {
                "delivery_id": delivery.delivery_id,
                "token": token,
                "attempts": tries,
                "status_code": attempt.status_code,
                "error": attempt.error,
                "new_state": state,
                "next_at": next_at,
                "delivered": delivered,
            }
        )
        if not attempt.ok:
            # Failures go to the attempt log; a success is recorded on the delivery itself (delivered_at,
            # last_status_code), which spares the common case a row.
            failures.append(
                {
                    "delivery_id": delivery.delivery_id,
                    "endpoint_id": delivery.endpoint_id,
                    "attempted_at": now,
                    "status_code": attempt.status_code,
                    "error": attempt.error,
                    "duration_ms": attempt.duration_ms,
                }
            )
    disabled: list[str] = []
    following: list[int] = []
    with runtime.engine().begin() as connection:
        if updates:
            connection.execute(_RECORD, updates)
        if failures:
            connection.execute(insert(WebhookAttempt), failures)
        if untouched:
            connection.execute(_UNLEASE, [{"delivery_id": d.delivery_id, "token": token} for d in untouched])
        if attempts and attempts[0].leased.endpoint_id != HOOK_TARGET:
            if _note_endpoint_health(connection, attempts, now, settings):
                disabled.append(attempts[0].leased.endpoint_id)
        for attempt in attempts:
            delivery = attempt.leased
            if attempt.ok and delivery.has_following:
                next_id = connection.execute(
                    _NEXT_OF_PAYMENT,
                    {
                        "endpoint_id": delivery.endpoint_id,
                        "payment_id": delivery.payment_id,
                        "delivery_id": delivery.delivery_id,
                    },
                ).scalar()
                if next_id is not None:
                    following.append(int(next_id))
    for endpoint_id in disabled:
        metrics.record_webhook_endpoint_disabled()
        log.error(
            "WEBHOOK ENDPOINT DISABLED: %s has failed every delivery for over %ds; its deliveries wait in the "
            "ledger: fix the receiver, then `stkpush webhook enable %s`",
            endpoint_id,
            settings.webhook_disable_after_s,
            endpoint_id,
        )
    for attempt in attempts:
        log.info(
            "webhook delivery %d (event %s to %s): %s",
            attempt.leased.delivery_id,
            attempt.leased.event_id,
            attempt.leased.endpoint_id,
            "delivered" if attempt.ok else f"failed ({attempt.error})",
        )
    if following:
        release(following)  # the payments' next events were waiting behind these
    return counts


def _note_endpoint_health(
    connection: Connection, attempts: list[Attempt], now: datetime, settings: Settings
) -> bool:
    """Track the endpoint's run of failures; True when this message's failure disabled it."""
    endpoint_id = attempts[0].leased.endpoint_id
    endpoint = col(WebhookEndpoint.id) == endpoint_id
    if attempts[-1].ok:
        if attempts[0].leased.failing_since is not None:
            connection.execute(update(WebhookEndpoint).where(endpoint).values(failing_since=None))
        return False
    if any(attempt.ok for attempt in attempts):
        # It answered this very message: a fresh run of failures starts now, not at an older failure.
        connection.execute(update(WebhookEndpoint).where(endpoint).values(failing_since=now))
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
