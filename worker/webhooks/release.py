"""Releasing deliveries: lease the due ones and queue `stkpush.webhooks.deliver` messages for them.

Deliveries wait in the ledger (`next_attempt_at`), never as long Celery countdowns: kombu's Redis transport
redelivers an ETA message that outlives `visibility_timeout`, and a retry schedule of days would outlive it. Beat
releases what is due every DISPATCH_INTERVAL_S; the process that commits an event releases its deliveries at once.

A release writes a fresh `lease_token` and `lease_until` on the rows and puts the token in the message. Only a
message carrying the current token may deliver (worker.webhooks.delivery), so the messages of an older lease do
nothing, and a worker that dies mid-delivery leaves a lease that runs out, after which the next tick releases the
delivery again: at least once, and the receiver drops duplicates by event id.

Order per payment: a delivery is releasable only when no earlier event of the same payment is still PENDING for
the same target, so a receiver never hears `payment.succeeded_after_failure` before `payment.expired`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import and_, bindparam, exists, or_, select, update

from worker import runtime
from worker.ledger import utcnow
from worker.webhooks.store import HOOK_TARGET, DeliveryState, WebhookDelivery, WebhookEndpoint

log = logging.getLogger("stkpush.webhooks")

DELIVER_TASK = "stkpush.webhooks.deliver"
WEBHOOKS_QUEUE = "webhooks"
# Upper bound on deliveries one tick leases, so a tick stays short whatever the backlog.
TICK_LIMIT = 500
# Deliveries to one target per message: a backlog (a receiver back from an outage) costs one ledger read per
# message instead of per delivery; the task stops early on a failure or when half its lease is gone.
BATCH_SIZE = 20

_D = WebhookDelivery.__table__.c  # type: ignore[attr-defined]
_W = WebhookEndpoint.__table__.c  # type: ignore[attr-defined]
_EARLIER = WebhookDelivery.__table__.alias("earlier")  # type: ignore[attr-defined]

# The statements are built once; each release only binds its values (bench/webhooks.py).
RELEASABLE = and_(
    _D.state == DeliveryState.PENDING,
    _D.next_attempt_at <= bindparam("now"),
    or_(_D.lease_until.is_(None), _D.lease_until <= bindparam("now")),
    or_(_D.endpoint_id == HOOK_TARGET, _D.endpoint_id.in_(select(_W.id).where(_W.enabled.is_(True)))),
    ~exists().where(
        _EARLIER.c.endpoint_id == _D.endpoint_id,
        _EARLIER.c.payment_id == _D.payment_id,
        _EARLIER.c.state == DeliveryState.PENDING,
        _EARLIER.c.event_seq < _D.event_seq,
    ),
)
_LEASE = (
    update(WebhookDelivery.__table__)  # type: ignore[attr-defined]
    .where(_D.id.in_(bindparam("ids", expanding=True)), RELEASABLE)
    .values(lease_token=bindparam("token"), lease_until=bindparam("until"))
)
_LEASED = (
    select(_D.id, _D.endpoint_id)
    .where(_D.lease_token == bindparam("token"))
    .order_by(_D.next_attempt_at, _D.event_seq)
)
_DUE = select(_D.id).where(RELEASABLE).order_by(_D.next_attempt_at, _D.event_seq).limit(bindparam("limit"))


def lease(
    delivery_ids: Iterable[int] | None = None, limit: int = TICK_LIMIT
) -> tuple[str, list[tuple[int, str]]]:
    """Lease the given deliveries (or up to `limit` due ones) under one token, in one transaction, if they are
    releasable. Returns the token and the (delivery id, target) pairs it now holds, in delivery order."""
    now = utcnow()
    token = secrets.token_hex(16)
    until = now + timedelta(seconds=runtime.settings().webhook_lease_s)
    with runtime.engine().begin() as connection:
        if delivery_ids is None:
            ids = list(connection.execute(_DUE, {"now": now, "limit": limit}).scalars())
        else:
            ids = list(delivery_ids)
        if not ids:
            return token, []
        connection.execute(_LEASE, {"ids": ids, "now": now, "token": token, "until": until})
        leased = connection.execute(_LEASED, {"token": token}).all()
    return token, [(int(row.id), str(row.endpoint_id)) for row in leased]


def batches(leased: list[tuple[int, str]]) -> list[list[int]]:
    """Leased deliveries grouped by target, in order, at most BATCH_SIZE per group."""
    by_target: dict[str, list[int]] = {}
    for delivery_id, target in leased:
        by_target.setdefault(target, []).append(delivery_id)
    return [ids[i : i + BATCH_SIZE] for ids in by_target.values() for i in range(0, len(ids), BATCH_SIZE)]


def release(delivery_ids: Iterable[int] | None = None, limit: int = TICK_LIMIT) -> int:
    """Lease and queue; returns how many deliveries went out in messages. None: every due delivery (beat)."""
    token, leased = lease(delivery_ids, limit)
    if not leased:
        return 0
    from worker.celery_app import app

    queued = 0
    for batch in batches(leased):
        try:
            app.send_task(DELIVER_TASK, args=[batch, token], queue=WEBHOOKS_QUEUE, retry=False)
            queued += len(batch)
        except Exception as error:  # the lease runs out and a later tick releases them again
            log.warning("%d webhook deliveries not queued (%s)", len(batch), type(error).__name__)
    return queued
