"""`/metrics`: the Prometheus endpoint. State is read at scrape time (ledger, guard); events come from the
counters that every process shares through Redis (worker/metrics.py, which says why)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func
from sqlmodel import col, select

from worker import other_channels, reconcile, runtime
from worker.events import Event
from worker.guard import recovery
from worker.ledger import Payment, PaymentState, count_by_state, session_scope, utcnow
from worker.metrics import shared
from worker.web.account_metrics import account_families
from worker.webhooks.store import DeliveryState, WebhookDelivery, WebhookEndpoint

log = logging.getLogger("stkpush.metrics")


# ---- read at scrape time ----------------------------------------------------------------------------------------


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class StkpushCollector(Collector):
    """Reads the ledger, the guard and the shared counters on every scrape; a part that fails reports up=0."""

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "stkpush_scrape_source_up", "Whether this scrape could read a source.", labels=["source"]
        )
        sources = (
            ("ledger", self._ledger),
            ("guard", self._guard),
            ("counters", self._counters),
            ("other_channels", self._other_channels),
            ("accounts", account_families),
        )
        for source, read in sources:
            try:
                families = list(read())
            except Exception as error:
                log.warning("metrics: could not read the %s (%s)", source, type(error).__name__)
                up.add_metric([source], 0)
                continue
            up.add_metric([source], 1)
            yield from families
        yield up

    def _ledger(self) -> Iterator[Metric]:
        engine, account = runtime.engine(), runtime.settings().upesipay_account
        payments = GaugeMetricFamily(
            "stkpush_payments", "Payments in the ledger, by state.", labels=["state"]
        )
        counts = count_by_state(engine, account)
        for state in PaymentState:
            payments.add_metric([state.value], counts.get(state.value, 0))
        yield payments
        # Ambiguous sends waiting for strong evidence (worker/ambiguous.py): an operator may need to look.
        yield _gauge(
            "stkpush_payments_unknown",
            "Payments whose send may or may not have reached UpesiPay (UNKNOWN): never resent blindly.",
            counts.get(PaymentState.UNKNOWN.value, 0),
        )
        now = utcnow()
        with session_scope(engine) as session:
            due, oldest = session.exec(
                select(func.count(), func.min(Payment.next_attempt_at)).where(
                    Payment.account == account,
                    Payment.state == PaymentState.DEFERRED,
                    col(Payment.next_attempt_at) <= now,
                )
            ).one()
        yield _gauge(
            "stkpush_deferred_backlog", "Payments waiting in DEFERRED.", counts[PaymentState.DEFERRED]
        )
        yield _gauge(
            "stkpush_deferred_due",
            "DEFERRED payments whose time has come (released as headroom allows).",
            due,
        )
        overdue = 0.0
        if oldest is not None:
            oldest_aware = oldest if oldest.tzinfo else oldest.replace(tzinfo=now.tzinfo)
            overdue = max((now - oldest_aware).total_seconds(), 0.0)
        yield _gauge(
            "stkpush_deferred_oldest_due_seconds",
            "How long the oldest due DEFERRED payment has waited past its time; growing means releases stalled.",
            overdue,
        )

        yield from _webhooks(engine, account)

    def _guard(self) -> Iterator[Metric]:
        guard = runtime.guard()
        snapshot = guard.account_snapshot()
        restricted_s = max((snapshot.restricted_until or 0) - time.time(), 0.0)
        yield _gauge(
            "stkpush_guard_failure_limit",
            "Failed outcomes allowed in the window.",
            guard.limits.account_failure_limit,
        )
        yield _gauge(
            "stkpush_guard_failures_in_window",
            "Failed outcomes in the sliding window.",
            snapshot.failures_in_window,
        )
        yield _gauge("stkpush_guard_in_flight", "Sends whose outcome is not known yet.", snapshot.in_flight)
        yield _gauge("stkpush_guard_headroom", "Sends the failure budget allows now.", snapshot.headroom)
        yield _gauge(
            "stkpush_guard_bulk_in_flight",
            "Batch sends whose outcome is not known yet.",
            snapshot.bulk_in_flight,
        )
        yield _gauge(
            "stkpush_guard_bulk_headroom",
            "Batch sends the bulk lane allows now (after the interactive reserve and the bulk cap).",
            snapshot.bulk_headroom,
        )
        yield _gauge(
            "stkpush_guard_restricted", "1 while the account is restricted.", 1 if restricted_s > 0 else 0
        )
        yield _gauge("stkpush_guard_restricted_seconds", "Seconds until the restriction ends.", restricted_s)
        yield _gauge(
            "stkpush_guard_blocked_numbers", "Numbers under a provider block.", snapshot.blocked_numbers
        )
        yield _gauge(
            "stkpush_guard_rebuilding",
            "1 while the guard's state is gone (Redis lost it) and every admit is refused until the rebuild.",
            0 if recovery.has_state(guard) else 1,
        )
        drift = reconcile.last_drift()
        yield _gauge(
            "stkpush_guard_drift",
            "Differences between the guard and the ledger found by the latest verify (-1: none ran lately).",
            -1 if drift is None else drift,
        )
        yield _gauge(
            "stkpush_sending_paused_seconds",
            "Seconds left of the account-wide pause after UpesiPay refused the credentials.",
            runtime.credentials_pause().remaining_s(),
        )

    def _other_channels(self) -> Iterator[Metric]:
        settings = runtime.settings()
        account = settings.upesipay_account
        yield _gauge(
            "stkpush_other_channel_failures_in_window",
            "Failed pushes the account made without stkpush, read from the transactions list, in the window.",
            other_channels.failures_in_window(account, settings.account_window_s),
        )
        reading = other_channels.last_reading(account)
        yield _gauge(
            "stkpush_transactions_list_readable",
            "1 when the last reading of the transactions list worked, 0 when it failed, -1 when none is known.",
            -1 if reading is None else int(bool(reading["readable"])),
        )

    def _counters(self) -> Iterator[Metric]:
        return shared().collect()


def _webhooks(engine: Engine, account: str) -> Iterator[Metric]:
    """Delivery backlog and disabled endpoints, read from the ledger: no counter to keep per delivery."""
    with session_scope(engine) as session:
        by_state = dict(
            session.exec(
                select(WebhookDelivery.state, func.count())
                .join(Event, col(Event.seq) == col(WebhookDelivery.event_seq))
                .where(Event.account == account)
                .group_by(WebhookDelivery.state)
            ).all()
        )
        disabled = session.exec(
            select(func.count()).where(
                WebhookEndpoint.account == account, col(WebhookEndpoint.enabled).is_(False)
            )
        ).one()
    deliveries = GaugeMetricFamily(
        "stkpush_webhook_deliveries", "Webhook and hook deliveries in the ledger, by state.", labels=["state"]
    )
    for state in DeliveryState:
        deliveries.add_metric([state.value], by_state.get(state, 0))
    yield deliveries
    yield _gauge(
        "stkpush_webhook_endpoints_disabled",
        "Webhook endpoints disabled (automatically after failing for days, or by an operator).",
        disabled,
    )


REGISTRY = CollectorRegistry()
REGISTRY.register(StkpushCollector())

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
