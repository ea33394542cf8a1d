"""Per-account families for `/metrics` (several UpesiPay accounts, worker/accounts.py): payments by state, the
guard's budget and restriction, and the credentials pause, each labelled with the account's name. The unlabelled
families of worker/web/metrics.py stay the environment's account's, as they always were.

Account names are an operator's labels, never secrets or personal data, so they may be metric labels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func
from sqlmodel import col, select

from worker import runtime
from worker.ledger import Payment, PaymentState, session_scope


def account_families() -> Iterator[Metric]:
    names = runtime.accounts()
    payments = GaugeMetricFamily(
        "stkpush_account_payments",
        "Payments in the ledger, by account and state.",
        labels=["account", "state"],
    )
    with session_scope(runtime.engine()) as session:
        counts = {
            (account, str(state)): int(count)
            for account, state, count in session.exec(
                select(Payment.account, Payment.state, func.count())
                .where(col(Payment.account).in_(names))
                .group_by(Payment.account, Payment.state)
            ).all()
        }
    for name in names:
        for state in PaymentState:
            payments.add_metric([name, state.value], counts.get((name, state.value), 0))
    yield payments
    headroom = GaugeMetricFamily(
        "stkpush_account_guard_headroom", "Sends the account's failure budget allows now.", labels=["account"]
    )
    failures = GaugeMetricFamily(
        "stkpush_account_guard_failures_in_window",
        "The account's failures in its window.",
        labels=["account"],
    )
    restricted = GaugeMetricFamily(
        "stkpush_account_guard_restricted", "1 while the account is restricted.", labels=["account"]
    )
    paused = GaugeMetricFamily(
        "stkpush_account_sending_paused_seconds",
        "Seconds left of the account's pause after UpesiPay refused its credentials.",
        labels=["account"],
    )
    now = time.time()
    for name in names:
        snapshot = runtime.guard_of(name).account_snapshot()
        headroom.add_metric([name], snapshot.headroom)
        failures.add_metric([name], snapshot.failures_in_window)
        restricted.add_metric([name], 1 if (snapshot.restricted_until or 0) > now else 0)
        paused.add_metric([name], runtime.credentials_pause_of(name).remaining_s())
    yield from (headroom, failures, restricted, paused)
