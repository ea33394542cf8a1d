"""Forecasts a merchant can read (docs/batches.md, "Forecasts"), from the ledger alone.

- The failure budget: the account's failures in the window (send attempts that ended in a failure, plus the
  failures of other channels), when the oldest of them slides out (`next_free_at`), and when the bulk lane gets
  room again if it has none (`bulk_free_at`). The guard counts the same facts (worker/guard_ledger.py).
- A running batch's estimated finish: its remaining rows are sent at the bulk lane's pace (BULK_MAX_INFLIGHT
  prompts at a time, each taking the batch's observed mean prompt time, or while it has fewer than
  PROMPT_SAMPLES ended prompts, the account's of the last window instead) while the window has room for their
  failures; a fluid simulation of the sliding window, with the window's current failures sliding out at their
  own times. The failure rate is the remaining rows' own: each row's chance to fail by its score (1 - score,
  worker/scoring.py), corrected by how the ended prompts of its score band did (`_remaining_failure_rate`). A
  batch sent likeliest payer first leaves its worst rows for last, and its early outcomes alone would promise
  too soon a finish; with no history (every score 0.5) the rate is the batch's observed one, Beta(1, 1)-smoothed,
  (F + 1) / (n + 2). With re-prompts each row is expected to be prompted 1 + r + r^2 + ... (up to N) times, r the
  failure rate, each re-prompt at least `reprompt_after_s` later.

The interactive reserve is left to checkouts, as the guard leaves it; interactive failures that will still come
are not foreseen (the estimate is for a quiet checkout).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlmodel import col

from worker import runtime, scoring
from worker.accounts import UnknownAccount
from worker.ledger import (
    WAITING_STATES,
    AttemptOutcome,
    Batch,
    ExternalFailure,
    Payment,
    PaymentState,
    SendAttempt,
    utcnow,
)
from worker.settings import Settings

__all__ = ["BatchForecast", "BudgetForecast", "batch_forecast", "budget_forecast", "project_finish"]

IN_FLIGHT = (PaymentState.SENDING, PaymentState.AWAITING_CALLBACK, PaymentState.UNKNOWN)
# A prompt's time from claim to outcome before the batch has any of its own (M-Pesa prompts time out in ~1 min).
DEFAULT_PROMPT_S = 30.0
# The batch's own ended prompts needed before their mean time is used alone; the account's recent ones (at most
# RECENT_PROMPTS, from the last window) fill in below that.
PROMPT_SAMPLES = 5
RECENT_PROMPTS = 200
# Score bands for the forecast's failure rate (by the score's chance to fail, tenths), and the weight of the
# scores' own word in a band against its observed outcomes (pseudo-outcomes).
SCORE_BANDS = 10
BAND_PRIOR = 2.0
# The simulation's bound: beyond this many steps the finish is reported as unknown.
MAX_STEPS = 200_000


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _expected_failure(score: float | None) -> float:
    """A row's chance to fail by its stored score (worker/scoring.py)."""
    return 1.0 - scoring.chance_to_pay(score)


def _score_band(expected_failure: float) -> int:
    return min(int(expected_failure * SCORE_BANDS), SCORE_BANDS - 1)


def _remaining_failure_rate(remaining: list[float], ended: list[tuple[float | None, Any]]) -> float:
    """The mean chance to fail of the rows left (their `_expected_failure`s), each corrected by how the ended
    prompts of its score band did: (F_b + K (1 - p_b)) / (n_b + K), so a band with no outcomes yet keeps its
    scores' word and one with many takes its own rate. Scores are shrunk towards 0.5 (a number has three or four
    outcomes), so the best band fails less than its scores say and the worst more; one factor for the whole batch,
    learnt from the best rows a scored batch sends first, would carry the best band's rate to the worst.
    With no history (one band, every score 0.5) this is (F + 1) / (n + 2)."""
    failed: dict[int, float] = {}
    seen: dict[int, float] = {}
    for score, outcome in ended:
        band = _score_band(_expected_failure(score))
        seen[band] = seen.get(band, 0.0) + 1
        failed[band] = failed.get(band, 0.0) + (str(outcome) == AttemptOutcome.FAILURE.value)
    if not remaining:
        return (sum(failed.values()) + 1) / (sum(seen.values()) + 2)
    total = 0.0
    for expected in remaining:
        band = _score_band(expected)
        total += (failed.get(band, 0.0) + BAND_PRIOR * expected) / (seen.get(band, 0.0) + BAND_PRIOR)
    return min(total / len(remaining), 1.0)


def _durations(rows: Iterable[Sequence[datetime | None]]) -> list[float]:
    """Seconds from claim to outcome of ended attempts (claimed, ended)."""
    return [(_aware(done) - _aware(claimed)).total_seconds() for claimed, done in rows if done and claimed]


@dataclass(frozen=True)
class BudgetForecast:
    limit: int
    reserve: int
    bulk_budget: int
    window_s: int
    failures_in_window: int
    in_flight: int
    failure_times: tuple[datetime, ...]  # oldest first, within the window
    next_free_at: datetime | None  # the oldest failure slides out of the window
    bulk_free_at: datetime | None  # the bulk lane has room again (None: it has room now, or waits on sends)

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "interactive_reserve": self.reserve,
            "bulk_budget": self.bulk_budget,
            "window_s": self.window_s,
            "failures_in_window": self.failures_in_window,
            "in_flight": self.in_flight,
            "next_free_at": self.next_free_at.isoformat() if self.next_free_at else None,
            "bulk_free_at": self.bulk_free_at.isoformat() if self.bulk_free_at else None,
        }


def _failure_times(connection: Connection, account: str, since: datetime) -> list[datetime]:
    """When the account's failures after `since` happened, oldest first: our attempts that ended in a failure and
    other channels' failures, as the provider's window counts them."""
    ours = connection.execute(
        select(col(SendAttempt.outcome_at)).where(
            col(SendAttempt.account) == account,
            col(SendAttempt.outcome) == AttemptOutcome.FAILURE,
            col(SendAttempt.outcome_at) > since,
        )
    ).scalars()
    theirs = connection.execute(
        select(col(ExternalFailure.failed_at)).where(
            col(ExternalFailure.account) == account, col(ExternalFailure.failed_at) > since
        )
    ).scalars()
    return sorted(_aware(moment) for moment in [*ours, *theirs] if moment is not None)


def budget_forecast(
    engine: Engine, account: str, settings: Settings, now: datetime | None = None
) -> BudgetForecast:
    now = now or utcnow()
    window = timedelta(seconds=settings.account_window_s)
    since = now - window
    with engine.connect() as connection:
        times = _failure_times(connection, account, since)
        in_flight = connection.execute(
            select(func.count())
            .select_from(SendAttempt)
            .where(col(SendAttempt.account) == account, col(SendAttempt.outcome).is_(None))
        ).scalar_one()
    bulk_budget = settings.account_failure_limit - settings.interactive_reserve
    must_leave = len(times) + int(in_flight) - bulk_budget + 1
    bulk_free_at = times[must_leave - 1] + window if 0 < must_leave <= len(times) else None
    return BudgetForecast(
        limit=settings.account_failure_limit,
        reserve=settings.interactive_reserve,
        bulk_budget=bulk_budget,
        window_s=settings.account_window_s,
        failures_in_window=len(times),
        in_flight=int(in_flight),
        failure_times=tuple(times),
        next_free_at=times[0] + window if times else None,
        bulk_free_at=bulk_free_at,
    )


def project_finish(
    *,
    now: datetime,
    prompts: float,
    failure_rate: float,
    prompt_s: float,
    max_inflight: int,
    bulk_budget: int,
    window_s: float,
    failure_times: tuple[datetime, ...] = (),
) -> datetime | None:
    """When `prompts` more prompts have ended, sent as the guard's bulk lane allows (see the module docstring);
    None when that is beyond the simulation's bound."""
    if prompts <= 0:
        return now
    prompt_s = max(prompt_s, 0.01)
    step = min(prompt_s / 4, window_s / 400)
    start = now.timestamp()
    window: deque[tuple[float, float]] = deque((moment.timestamp(), 1.0) for moment in failure_times)
    in_window = float(len(window))
    left = prompts
    t = start
    for _ in range(MAX_STEPS):
        while window and window[0][0] <= t - window_s:
            in_window -= window.popleft()[1]
        room = bulk_budget - in_window
        concurrency = min(float(max_inflight), max(room, 0.0))
        if concurrency > 0:
            sent = min(left, concurrency * step / prompt_s)
            left -= sent
            if failure_rate > 0:
                window.append((t, sent * failure_rate))
                in_window += sent * failure_rate
            if left <= 1e-9:
                return datetime.fromtimestamp(t + prompt_s, UTC)
        t += step
    return None


@dataclass(frozen=True)
class BatchForecast:
    remaining: int  # rows not yet ended (waiting or in flight)
    prompts_ended: int
    failure_rate: float
    prompt_s: float
    finish_at: datetime | None
    account: str = ""  # the batch's account, whose own limits the forecast used

    def as_dict(self) -> dict[str, Any]:
        return {
            "remaining_rows": self.remaining,
            "prompts_ended": self.prompts_ended,
            "observed_failure_rate": round(self.failure_rate, 3),
            "prompt_s": round(self.prompt_s, 2),
            "finish_at": self.finish_at.isoformat() if self.finish_at else None,
        }


def batch_forecast(
    engine: Engine, batch_id: str, settings: Settings, now: datetime | None = None
) -> BatchForecast | None:
    """The batch's estimated finish; None when it has no such batch."""
    now = now or utcnow()
    with engine.connect() as connection:
        batch = connection.execute(
            select(col(Batch.account), col(Batch.reprompt_max), col(Batch.reprompt_after_s)).where(
                col(Batch.id) == batch_id
            )
        ).first()
        if batch is None:
            return None
        account = str(batch[0])
        remaining_scores = connection.execute(
            select(col(Payment.score)).where(
                col(Payment.batch_id) == batch_id, col(Payment.state).in_([*WAITING_STATES, *IN_FLIGHT])
            )
        ).scalars()
        remaining_expected = [_expected_failure(score) for score in remaining_scores]
        ended = connection.execute(
            select(
                col(SendAttempt.outcome),
                col(SendAttempt.created_at),
                col(SendAttempt.outcome_at),
                col(Payment.score),
            )
            .join(Payment, col(Payment.id) == col(SendAttempt.payment_id))
            .where(
                col(Payment.batch_id) == batch_id,
                col(SendAttempt.outcome).in_([AttemptOutcome.SUCCESS, AttemptOutcome.FAILURE]),
            )
        ).all()
        durations = _durations(row[1:3] for row in ended)
        if len(durations) < PROMPT_SAMPLES:
            # Too few of its own yet (a fast batch is 10% prompted before its first prompts end): the account's
            # prompts of the last window, any batch's or single, tell the pace better than a default.
            recent = connection.execute(
                select(col(SendAttempt.created_at), col(SendAttempt.outcome_at))
                .where(
                    col(SendAttempt.account) == account,
                    col(SendAttempt.outcome).in_([AttemptOutcome.SUCCESS, AttemptOutcome.FAILURE]),
                    col(SendAttempt.outcome_at) > now - timedelta(seconds=settings.account_window_s),
                )
                .order_by(col(SendAttempt.outcome_at).desc())
                .limit(RECENT_PROMPTS)
            ).all()
            durations = _durations(recent) or durations  # the batch's own are among them
    rate = _remaining_failure_rate(remaining_expected, [(row[3], row[0]) for row in ended])
    remaining = len(remaining_expected)
    prompt_s = sum(durations) / len(durations) if durations else DEFAULT_PROMPT_S
    _, reprompt_max, reprompt_after_s = batch
    settings = _with_account_limits(settings, account)
    per_row = sum(rate**k for k in range(int(reprompt_max or 0) + 1))
    budget = budget_forecast(engine, account, settings, now)
    finish = project_finish(
        now=now,
        prompts=int(remaining) * per_row,
        failure_rate=rate,
        prompt_s=prompt_s,
        max_inflight=settings.bulk_max_inflight,
        bulk_budget=budget.bulk_budget,
        window_s=settings.account_window_s,
        failure_times=budget.failure_times,
    )
    if finish is not None and remaining and reprompt_max and reprompt_after_s:
        # The last row's last re-prompt comes at least this long after its first prompt.
        finish = max(finish, now + timedelta(seconds=int(reprompt_after_s) * min(per_row - 1, reprompt_max)))
    return BatchForecast(remaining, len(ended), rate, prompt_s, finish, account)


def _with_account_limits(settings: Settings, account: str) -> Settings:
    """`settings` with a stored account's own limits (the environment's account and an unknown one: as given)."""
    if account == settings.upesipay_account:
        return settings
    try:
        return runtime.account(account).with_limits(settings)
    except UnknownAccount:
        return settings


def describe_budget(forecast: BudgetForecast, now: datetime | None = None) -> list[str]:
    """Lines for `stkpush guard` and the dashboard: the window's use and when it frees."""
    now = now or utcnow()
    lines = [
        f"failure window: {forecast.failures_in_window} of {forecast.limit} in the last {forecast.window_s} s "
        f"(bulk lane {forecast.bulk_budget}, reserve {forecast.reserve}), {forecast.in_flight} in flight"
    ]
    if forecast.next_free_at is not None:
        lines.append(
            f"budget frees next at {forecast.next_free_at:%Y-%m-%d %H:%M:%S}Z ({_in(forecast.next_free_at, now)})"
        )
    if forecast.bulk_free_at is not None:
        lines.append(
            f"bulk lane full until {forecast.bulk_free_at:%Y-%m-%d %H:%M:%S}Z ({_in(forecast.bulk_free_at, now)})"
        )
    return lines


def _in(moment: datetime, now: datetime) -> str:
    seconds = max((moment - now).total_seconds(), 0.0)
    if seconds < 120:
        return f"in {seconds:.0f} s"
    if seconds < 7200:
        return f"in {seconds / 60:.0f} min"
    return f"in {seconds / 3600:.1f} h"


def window_series(
    engine: Engine,
    account: str,
    settings: Settings,
    now: datetime | None = None,
    span_s: int = 6 * 3600,
    points: int = 73,
) -> list[dict[str, Any]]:
    """The failures in the window at `points` evenly spaced moments over the last `span_s` (oldest first), from
    the ledger: the dashboard's chart."""
    now = now or utcnow()
    window = timedelta(seconds=settings.account_window_s)
    since = now - timedelta(seconds=span_s) - window
    with engine.connect() as connection:
        times = [moment.timestamp() for moment in _failure_times(connection, account, since)]
    series = []
    first = bisect_left = 0
    for index in range(points):
        moment = now - timedelta(seconds=span_s * (points - 1 - index) / (points - 1))
        at = moment.timestamp()
        while first < len(times) and times[first] <= at - settings.account_window_s:
            first += 1
        while bisect_left < len(times) and times[bisect_left] <= at:
            bisect_left += 1
        series.append({"at": moment.isoformat(timespec="seconds"), "failures": max(bisect_left - first, 0)})
    return series
