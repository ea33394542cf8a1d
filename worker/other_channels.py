"""Failures the account made without stkpush count in our window too.

A merchant may also prompt customers through UpesiPay's payment buttons or dashboard; UpesiPay counts those
failures in the same 6-hour window. Beat reads the newest pages of the transactions list (bounded, cheap), and
every failed push that is not ours is recorded in the ledger (`external_failure`, once per provider reference)
and then counted by the guard at its own time. The ledger row comes first and notes when the guard confirmed, so a
crash or a lost Redis write between the two is retold on the next pass, never counted twice (the guard's window
member names the reference).

The list's shape is undocumented and failed prompts may never appear in it (docs/upesipay.md): when it can't be
read, or shows no statuses, nothing is counted, the metric and the dashboard say so, and the margin between
ACCOUNT_FAILURE_LIMIT and UpesiPay's 50 is what protects the account.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import func, update
from sqlmodel import col, select

from worker import runtime
from worker.ledger import (
    ExternalFailure,
    Payment,
    SendAttempt,
    insert_ignoring_conflicts,
    session_scope,
    utcnow,
)
from worker.upesipay import ListedPush

log = logging.getLogger("stkpush.other_channels")

# How long the last reading of the list is kept for /metrics and the dashboard: past it, "unknown".
STATUS_TTL_S = 24 * 3600


def _status_key(account: str) -> str:
    return f"stkpush:{{{account}}}:oc"


def count_other_channel_failures(account: str | None = None) -> int:
    """One pass: read the list, record what is new, tell the guard what it has not confirmed. Returns how many
    failures the guard counted in this pass. For `account`, or (None) for every enabled account, each reading
    its own transactions list with its own token."""
    if account is None:
        return sum(count_other_channel_failures(name) for name in runtime.accounts())
    settings = runtime.settings()
    pushes, problem = runtime.upesipay_of(account).recent_failed_pushes(
        max_pages=settings.other_channels_pages
    )
    _note_reading(account, problem, len(pushes))
    if problem is not None:
        log.warning("transactions list not read (%s): failures from other channels are not counted", problem)
    recorded = _record_new(account, pushes, runtime.guard_of(account).limits.account_window_s)
    if recorded:
        log.warning("%d failed pushes from other channels counted against the failure budget", recorded)
    return tell_guard_owed(account)


def _record_new(account: str, pushes: list[ListedPush], window_s: float) -> int:
    now = utcnow()
    horizon = now - timedelta(seconds=window_s)
    # A push without a readable time is taken as failing now: it then counts a little longer, never shorter.
    recent = [(push, push.failed_at or now) for push in pushes if (push.failed_at or now) > horizon]
    if not recent:
        return 0
    references = {push.reference for push, _ in recent}
    externals = {push.external_reference for push, _ in recent if push.external_reference}
    with session_scope(runtime.engine()) as session:
        # Every attempt's reference, not only each payment's latest: an earlier attempt of a payment sent again
        # that failed at UpesiPay is ours too, counted through that attempt.
        ours = set(
            session.exec(
                select(SendAttempt.provider_reference).where(
                    SendAttempt.account == account, col(SendAttempt.provider_reference).in_(references)
                )
            ).all()
        ) | set(
            session.exec(
                select(Payment.provider_reference).where(
                    Payment.account == account, col(Payment.provider_reference).in_(references)
                )
            ).all()
        )
        our_externals = set(
            session.exec(
                select(Payment.external_reference).where(
                    Payment.account == account, col(Payment.external_reference).in_(externals)
                )
            ).all()
        )
    rows = [
        {"account": account, "provider_reference": push.reference, "failed_at": failed_at, "seen_at": now}
        for push, failed_at in recent
        # Ours are counted through their own send attempt: by provider reference, or by our external reference
        # when the send was ambiguous and we never learned the provider's reference.
        if push.reference not in ours
        and (push.external_reference is None or push.external_reference not in our_externals)
    ]
    if not rows:
        return 0
    table: Any = ExternalFailure.__table__  # type: ignore[attr-defined]
    with runtime.engine().begin() as connection:
        return int(connection.execute(insert_ignoring_conflicts(connection, table), rows).rowcount or 0)


def tell_guard_owed(account: str | None = None) -> int:
    """Count in the guard every recorded failure inside the window it has not confirmed yet."""
    guard = runtime.guard_of(account)
    horizon = utcnow() - timedelta(seconds=guard.limits.account_window_s)
    with session_scope(runtime.engine()) as session:
        owed = session.exec(
            select(ExternalFailure.provider_reference, ExternalFailure.failed_at).where(
                ExternalFailure.account == guard.account,
                col(ExternalFailure.guard_told_at).is_(None),
                col(ExternalFailure.failed_at) > horizon,
            )
        ).all()
    counted = 0
    for reference, failed_at in owed:
        counted += guard.count_external_failure(reference, failed_at.timestamp())
        with runtime.engine().begin() as connection:
            connection.execute(
                update(ExternalFailure)
                .where(
                    col(ExternalFailure.account) == guard.account,
                    col(ExternalFailure.provider_reference) == reference,
                )
                .values(guard_told_at=utcnow())
            )
    return counted


def failures_in_window(account: str, window_s: int) -> int:
    horizon = utcnow() - timedelta(seconds=window_s)
    with session_scope(runtime.engine()) as session:
        return int(
            session.exec(
                select(func.count()).where(
                    ExternalFailure.account == account, col(ExternalFailure.failed_at) > horizon
                )
            ).one()
        )


def _note_reading(account: str, problem: str | None, failed_seen: int) -> None:
    status = {"readable": problem is None, "problem": problem, "at": time.time(), "failed_seen": failed_seen}
    try:
        runtime.redis_client().set(_status_key(account), json.dumps(status), ex=STATUS_TTL_S)
    except Exception as error:  # a status note must never stop the counting
        log.warning("could not note the list reading (%s)", type(error).__name__)


def last_reading(account: str) -> dict[str, Any] | None:
    """The last pass's reading of the list ({readable, problem, at, failed_seen}), or None when unknown."""
    raw = runtime.redis_client().get(_status_key(account))
    if raw is None:
        return None
    reading: dict[str, Any] = json.loads(raw)
    return reading
