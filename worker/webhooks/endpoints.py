"""Managing endpoints (add, list, enable, disable), their delivery log, and replaying events.

Used by `stkpush webhook ...` and the `/webhooks` API. Bad input raises `WebhookInputError` naming the field and
its rule, and changes nothing. A signing secret is returned once, by `add_endpoint`; nothing else shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import update
from sqlmodel import col, select

from worker import runtime
from worker.events import Event, EventType
from worker.ledger import session_scope, utcnow
from worker.webhooks.release import TICK_LIMIT, release
from worker.webhooks.store import (
    ALL_EVENTS,
    DeliveryState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    new_signing_secret,
    subscribed,
)

MAX_URL_LENGTH = 2048
# A replay by time touches at most this many events per call: a typo in --since must not queue a year of events.
MAX_REPLAY_EVENTS = 10_000


class WebhookInputError(ValueError):
    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


@dataclass(frozen=True)
class NewEndpoint:
    endpoint: WebhookEndpoint
    secret: str  # shown to the merchant once


def parse_events(raw: str | list[str] | None) -> str:
    items = raw.split(",") if isinstance(raw, str) else list(raw or [ALL_EVENTS])
    wanted = sorted({item.strip() for item in items if item.strip()})
    if not wanted:
        return ALL_EVENTS
    known = {member.value for member in EventType} | {ALL_EVENTS}
    unknown = [item for item in wanted if item not in known]
    if unknown:
        raise WebhookInputError(
            "events", f"must be {ALL_EVENTS} or among {', '.join(sorted(known - {ALL_EVENTS}))}"
        )
    return ALL_EVENTS if ALL_EVENTS in wanted else ",".join(wanted)


def check_url(url: object) -> str:
    if not isinstance(url, str) or not url:
        raise WebhookInputError("url", "is required: an http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookInputError("url", f"must be at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookInputError("url", "must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise WebhookInputError("url", "must not carry a user or password (the signature authenticates us)")
    return url


def add_endpoint(url: object, events: str | list[str] | None = None) -> NewEndpoint:
    checked = check_url(url)
    endpoint = WebhookEndpoint(
        account=runtime.settings().upesipay_account,
        url=checked,
        secret=new_signing_secret(),
        events=parse_events(events),
        created_at=utcnow(),
    )
    with session_scope(runtime.engine()) as session:
        session.add(endpoint)
        session.commit()
        session.refresh(endpoint)
    return NewEndpoint(endpoint=endpoint, secret=endpoint.secret)


def endpoint_view(endpoint: WebhookEndpoint) -> dict[str, Any]:
    """What may be shown of an endpoint: never its secret."""
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "events": endpoint.events.split(","),
        "enabled": endpoint.enabled,
        "disabled_reason": endpoint.disabled_reason,
        "failing_since": endpoint.failing_since.isoformat() if endpoint.failing_since else None,
        "created_at": endpoint.created_at.isoformat(),
    }


def list_endpoints() -> list[WebhookEndpoint]:
    with session_scope(runtime.engine()) as session:
        return list(
            session.exec(
                select(WebhookEndpoint)
                .where(col(WebhookEndpoint.account) == runtime.settings().upesipay_account)
                .order_by(col(WebhookEndpoint.created_at))
            ).all()
        )


def get_endpoint(endpoint_id: str) -> WebhookEndpoint | None:
    with session_scope(runtime.engine()) as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
    if endpoint is None or endpoint.account != runtime.settings().upesipay_account:
        return None
    return endpoint


def set_enabled(endpoint_id: str, enabled: bool) -> WebhookEndpoint:
    if get_endpoint(endpoint_id) is None:
        raise WebhookInputError("endpoint", "no such endpoint for this account")
    values: dict[str, Any] = {"enabled": enabled}
    if enabled:
        values.update(disabled_reason=None, failing_since=None)
    else:
        values["disabled_reason"] = "disabled by an operator"
    with runtime.engine().begin() as connection:
        connection.execute(
            update(WebhookEndpoint).where(col(WebhookEndpoint.id) == endpoint_id).values(**values)
        )
    endpoint = get_endpoint(endpoint_id)
    assert endpoint is not None
    return endpoint


def delivery_log(endpoint_id: str, limit: int = 50) -> list[dict[str, Any]]:
    """The endpoint's latest deliveries, newest first, each with its attempts."""
    with session_scope(runtime.engine()) as session:
        rows = session.exec(
            select(WebhookDelivery, Event)
            .join(Event, col(Event.seq) == col(WebhookDelivery.event_seq))
            .where(col(WebhookDelivery.endpoint_id) == endpoint_id)
            .order_by(col(WebhookDelivery.id).desc())
            .limit(limit)
        ).all()
        ids = [delivery.id for delivery, _ in rows]
        attempts = session.exec(
            select(WebhookAttempt)
            .where(col(WebhookAttempt.delivery_id).in_(ids))
            .order_by(col(WebhookAttempt.id))
        ).all()
    by_delivery: dict[int, list[dict[str, Any]]] = {}
    for attempt in attempts:
        by_delivery.setdefault(attempt.delivery_id, []).append(
            {
                "at": attempt.attempted_at.isoformat(),
                "status_code": attempt.status_code,
                "error": attempt.error,
                "duration_ms": attempt.duration_ms,
            }
        )
    return [
        {
            "delivery_id": delivery.id,
            "event_id": event.id,
            "event_type": event.type,
            "state": delivery.state.value,
            "attempts": delivery.attempts,
            "last_status_code": delivery.last_status_code,
            "last_error": delivery.last_error,
            "next_attempt_at": delivery.next_attempt_at.isoformat()
            if delivery.state == DeliveryState.PENDING
            else None,
            "delivered_at": delivery.delivered_at.isoformat() if delivery.delivered_at else None,
            "log": [*by_delivery.get(delivery.id or 0, []), *_success(delivery)],
        }
        for delivery, event in rows
    ]


def _success(delivery: WebhookDelivery) -> list[dict[str, Any]]:
    """The successful attempt, kept on the delivery row rather than in the attempt log."""
    if delivery.state != DeliveryState.DELIVERED or delivery.delivered_at is None:
        return []
    at = delivery.delivered_at.isoformat()
    return [{"at": at, "status_code": delivery.last_status_code, "error": None, "duration_ms": None}]


def replay(event_id: str | None = None, since: datetime | None = None, endpoint_id: str | None = None) -> int:
    """Deliver events again, as new deliveries (each with a fresh retry window); returns how many were made.

    The receiver sees the same event id again, which is how it knows a replay from a new event."""
    if (event_id is None) == (since is None):
        raise WebhookInputError("event", "give exactly one of an event id or --since")
    account = runtime.settings().upesipay_account
    targets = [e for e in list_endpoints() if e.enabled and (endpoint_id is None or e.id == endpoint_id)]
    if endpoint_id is not None and not targets:
        raise WebhookInputError("endpoint", "no such enabled endpoint for this account")
    with session_scope(runtime.engine()) as session:
        query = select(Event).where(col(Event.account) == account)
        if event_id is not None:
            query = query.where(col(Event.id) == event_id)
        else:
            query = query.where(col(Event.created_at) >= since)
        events = session.exec(query.order_by(col(Event.seq)).limit(MAX_REPLAY_EVENTS)).all()
    if event_id is not None and not events:
        raise WebhookInputError("event", "no such event for this account")
    now = utcnow()
    made: list[int] = []
    with session_scope(runtime.engine()) as session:
        for event in events:
            for endpoint in targets:
                if not subscribed(endpoint.events, event.type):
                    continue
                delivery = WebhookDelivery(
                    event_seq=event.seq or 0,
                    endpoint_id=endpoint.id,
                    payment_id=event.payment_id,
                    next_attempt_at=now,
                    created_at=now,
                )
                session.add(delivery)
                session.flush()
                made.append(delivery.id or 0)
        session.commit()
    for start in range(0, len(made), TICK_LIMIT):
        release(made[start : start + TICK_LIMIT])
    return len(made)
