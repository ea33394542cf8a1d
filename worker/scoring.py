"""A number's expected chance to pay, from its own history on this account in the ledger (docs/batches.md,
"Release order").

For every earlier prompt to the number on this account (a send attempt that ended in a success or a failure;
a failure taken back by a late success counts as a success; a request UpesiPay refused itself prompted nobody and
is left out), weight w = 0.5 ** (age / HALF_LIFE_DAYS):

    S = sum of w over successes
    F = sum of w over failures, a cancellation counting CANCELLED_WEIGHT = 0.25 (the number is reachable and its
        owner answers; a prompt nobody answers counts fully: with two payments beside it, one cancellation a
        month ago must rank above one unanswered prompt three months ago)
    score = (PRIOR_SUCCESSES + S) / (PRIOR_SUCCESSES + PRIOR_FAILURES + S + F)

A Beta(1, 1) prior: a number without history scores 0.5 and sits between those that paid and those that did not.
A number with a current streak (STREAK_LAST failures or more since its last success) or a cancellation in the
last RECENT_CANCEL_DAYS is moved below every other: its score has BAND_OFFSET (1) taken off (so it lies in
[-1, 0)); `chance_to_pay` adds it back.

Everything is read in one query per chunk of numbers; no phone leaves this module: callers get scores keyed by
the phone they passed, and store the score on the row (Payment.score), never next to an unmasked phone.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, select
from sqlmodel import col

from worker.ledger import AttemptOutcome, Payment, PaymentState, SendAttempt, utcnow

__all__ = ["NO_HISTORY", "History", "chance_to_pay", "score_of", "scores_for"]

PRIOR_SUCCESSES = 1.0
PRIOR_FAILURES = 1.0
HALF_LIFE_DAYS = 90.0
CANCELLED_WEIGHT = 0.25
STREAK_LAST = 2
# Taken off the score of a number with a current streak or a recent cancellation: below every other number.
BAND_OFFSET = 1.0
RECENT_CANCEL_DAYS = 7.0
# Outcomes older than this are not read at all (their weight is below 6%).
LOOKBACK_DAYS = 365
NO_HISTORY = PRIOR_SUCCESSES / (PRIOR_SUCCESSES + PRIOR_FAILURES)
# Numbers per query: well below every database's limit on bound parameters.
_CHUNK = 500
_COUNTED = (AttemptOutcome.SUCCESS, AttemptOutcome.FAILURE, AttemptOutcome.REVERTED)


@dataclass
class History:
    """One number's earlier prompts: (when it ended, paid, cancelled), any order."""

    outcomes: list[tuple[datetime, bool, bool]] = field(default_factory=list)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment  # SQLite hands back naive UTC


def score_of(history: History, now: datetime) -> float:
    """The formula of the module docstring."""
    successes = failures = 0.0
    streak = 0
    recent_cancel = False
    for ended, paid, cancelled in sorted(history.outcomes, key=lambda item: item[0]):
        age_days = max((now - ended).total_seconds(), 0.0) / 86400
        weight = 0.5 ** (age_days / HALF_LIFE_DAYS)
        if paid:
            successes += weight
            streak = 0
        else:
            failures += weight * (CANCELLED_WEIGHT if cancelled else 1.0)
            streak += 1
            recent_cancel = recent_cancel or (cancelled and age_days <= RECENT_CANCEL_DAYS)
    score = (PRIOR_SUCCESSES + successes) / (PRIOR_SUCCESSES + PRIOR_FAILURES + successes + failures)
    if streak >= STREAK_LAST or recent_cancel:
        score -= BAND_OFFSET
    return score


def chance_to_pay(score: float | None) -> float:
    """The formula's estimate itself, in [0, 1], of a stored score: the band below has BAND_OFFSET added back;
    a row without a score is a number without history."""
    if score is None:
        return NO_HISTORY
    return min(max(score + BAND_OFFSET if score < 0 else score, 0.0), 1.0)


def scores_for(
    connection: Connection, account: str, phones: Iterable[str], now: datetime | None = None
) -> dict[str, float]:
    """The score of every number in `phones` on `account` (NO_HISTORY for a number never prompted)."""
    now = now or utcnow()
    wanted = sorted(set(phones))
    histories: dict[str, History] = defaultdict(History)
    since = now - timedelta(days=LOOKBACK_DAYS)
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        rows = connection.execute(
            select(
                col(Payment.phone),
                col(SendAttempt.outcome),
                col(SendAttempt.outcome_at),
                col(Payment.state),
                col(Payment.guard_token) == col(SendAttempt.id),
            )
            .join(Payment, col(Payment.id) == col(SendAttempt.payment_id))
            .where(
                col(SendAttempt.account) == account,
                col(Payment.phone).in_(chunk),
                col(SendAttempt.outcome).in_([outcome.value for outcome in _COUNTED]),
                col(SendAttempt.outcome_at) >= since,
            )
        ).all()
        for phone, outcome, ended, state, current in rows:
            if ended is None:
                continue
            state = PaymentState(state)
            if current and state == PaymentState.REJECTED:
                continue  # UpesiPay refused the request itself: nobody was prompted
            paid = str(outcome) != AttemptOutcome.FAILURE.value
            # Only the payment's latest attempt keeps its kind of failure; an earlier one counts fully.
            cancelled = bool(current) and state == PaymentState.CANCELLED
            histories[phone].outcomes.append((_aware(ended), paid, cancelled))
    return {phone: score_of(histories[phone], now) if phone in histories else NO_HISTORY for phone in wanted}
