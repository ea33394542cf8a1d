"""What the ledger implies the guard's state is: the image a rebuild writes and `guard verify` compares against.

Derived from send attempts, recorded provider blocks and failures from other channels
alone (DESIGN: the ledger is the truth):
- a reservation for every attempt without an outcome (claimed, maybe sent): it may still fail;
- the window's failures at their outcome times;
- each number's current streak, by replaying its outcomes with the guard's own time rules (lib.lua,
  phone_state): a success resets it, a streak at the limit rests `cooldown`, one below it is forgotten after
  `memory`; a failure later taken back by a late success (REVERTED) counts as neither (but still for the
  restriction it may have caused when it happened);
- the restriction the window's history caused (the tier crossings) and the provider's own, and its blocks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlalchemy import select as sa_select
from sqlmodel import col, select

from worker.guard import GuardLimits
from worker.guard.recovery import Failure, GuardImage, PhoneImage, Reservation
from worker.ledger import (
    AttemptOutcome,
    ExternalFailure,
    GuardBlock,
    GuardBlockKind,
    Payment,
    PhoneRelease,
    SendAttempt,
    session_scope,
)

__all__ = ["LedgerView", "implied_image", "ms_of"]

# Numbers are looked up in chunks: well below every database's limit on bound parameters.
_CHUNK = 500


def ms_of(moment: datetime) -> int:
    if moment.tzinfo is None:  # SQLite hands back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return round(moment.timestamp() * 1000)


@dataclass
class LedgerView:
    """The image plus what verify needs to tell settled facts from ones still on their way to the guard."""

    image: GuardImage
    finished: dict[str, tuple[AttemptOutcome, int, bool]]  # attempt id -> outcome, outcome ms, guard told
    in_flight_created_ms: dict[str, int]  # attempt id -> claimed at (ms), for attempts without an outcome


def _memory_s(limits: GuardLimits) -> float:
    return limits.phone_memory_s


def implied_image(engine: Engine, account: str, limits: GuardLimits, now_ms: int) -> LedgerView:
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    longest_tier = max((seconds for _, seconds in limits.restriction_tiers), default=0.0)
    lookback = now - timedelta(seconds=max(_memory_s(limits), limits.account_window_s + longest_tier))
    with session_scope(engine) as session:
        # One transaction: reservations and outcomes are read at one instant.
        open_rows = session.exec(
            select(SendAttempt.id, SendAttempt.lane, SendAttempt.created_at, Payment.phone)
            .join(Payment, col(Payment.id) == col(SendAttempt.payment_id))
            .where(col(SendAttempt.account) == account, col(SendAttempt.outcome).is_(None))
        ).all()
        recent_failing = session.exec(
            select(Payment.phone)
            .join(SendAttempt, col(Payment.id) == col(SendAttempt.payment_id))
            .where(
                col(SendAttempt.account) == account,
                col(SendAttempt.outcome).in_([AttemptOutcome.FAILURE, AttemptOutcome.REVERTED]),
                col(SendAttempt.outcome_at) > lookback,
            )
            .distinct()
        ).all()
        phones = sorted(set(recent_failing))
        outcomes: list[tuple[str, AttemptOutcome, datetime, bool, str]] = []
        for start in range(0, len(phones), _CHUNK):
            chunk = phones[start : start + _CHUNK]
            for attempt_id, outcome, outcome_at, told, phone in session.execute(
                sa_select(
                    col(SendAttempt.id),
                    col(SendAttempt.outcome),
                    col(SendAttempt.outcome_at),
                    col(SendAttempt.guard_resolved_at),
                    col(Payment.phone),
                )
                .join(Payment, col(Payment.id) == col(SendAttempt.payment_id))
                .where(
                    col(SendAttempt.account) == account,
                    col(Payment.phone).in_(chunk),
                    col(SendAttempt.outcome).in_(
                        [AttemptOutcome.FAILURE, AttemptOutcome.SUCCESS, AttemptOutcome.REVERTED]
                    ),
                )
            ).all():
                assert outcome is not None and outcome_at is not None
                outcomes.append((attempt_id, AttemptOutcome(outcome), outcome_at, told is not None, phone))
        untold = session.exec(
            select(SendAttempt.id, SendAttempt.outcome, SendAttempt.outcome_at).where(
                col(SendAttempt.account) == account,
                col(SendAttempt.outcome).is_not(None),
                col(SendAttempt.guard_resolved_at).is_(None),
            )
        ).all()
        blocks = session.exec(
            select(GuardBlock).where(col(GuardBlock.account) == account, col(GuardBlock.until) > now)
        ).all()
        releases = session.exec(
            select(PhoneRelease.id, PhoneRelease.released_at, PhoneRelease.phone).where(
                col(PhoneRelease.account) == account, col(PhoneRelease.released_at) > lookback
            )
        ).all()
        external = session.exec(
            select(ExternalFailure.provider_reference, ExternalFailure.failed_at).where(
                col(ExternalFailure.account) == account, col(ExternalFailure.failed_at) > lookback
            )
        ).all()

    image = GuardImage()
    busy: dict[str, int] = defaultdict(int)
    in_flight_created: dict[str, int] = {}
    for attempt_id, lane, created_at, phone in open_rows:
        image.reservations.append(Reservation(attempt_id, phone, lane))
        busy[phone] += 1
        in_flight_created[attempt_id] = ms_of(created_at)

    finished: dict[str, tuple[AttemptOutcome, int, bool]] = {}
    for attempt_id, outcome, outcome_at, told, _phone in outcomes:
        finished[attempt_id] = (outcome, ms_of(outcome_at), told)
    for attempt_id, outcome, outcome_at in untold:
        if outcome is not None and outcome_at is not None:
            finished.setdefault(attempt_id, (AttemptOutcome(outcome), ms_of(outcome_at), False))

    # An operator's release starts the number's streak afresh, as a success does (worker/reconcile.py).
    for release_id, released_at, phone in releases:
        outcomes.append((f"release:{release_id}", AttemptOutcome.SUCCESS, released_at, True, phone))
    # Replay every outcome in time order: the sequence numbers then follow the order the guard saw them in.
    outcomes.sort(key=lambda row: (ms_of(row[2]), row[0]))
    state: dict[str, list[int]] = {}  # phone -> [streak, last failure ms, run_seq]
    window_start = now_ms - round(limits.account_window_s * 1000)
    failure_times: list[int] = []
    for attempt_id, outcome, outcome_at, _told, phone in outcomes:
        at = ms_of(outcome_at)
        streak, last, run_seq = state.get(phone, [0, 0, 0])
        streak, last, run_seq = _forget(streak, last, run_seq, at, limits)
        if outcome == AttemptOutcome.SUCCESS:
            streak, last, run_seq = 0, 0, 0
        elif outcome == AttemptOutcome.REVERTED:
            # Taken back from the window and the streak, but the guard counted it when it happened: a
            # restriction its failure caused still stands (the stricter reading).
            image.seq += 1
            failure_times.append(at)
        else:
            image.seq += 1
            if streak == 0:
                run_seq = image.seq
            streak, last = streak + 1, at
            failure_times.append(at)
            if at > window_start:
                image.failures.append(Failure(at, image.seq, phone, attempt_id))
        state[phone] = [streak, last, run_seq]

    # Failures from other channels (worker/other_channels.py) fill the window and may cross a tier; they belong to
    # no number, so no streak (external.lua's member form: seq 0, phone '-').
    for reference, failed_at in external:
        at = ms_of(failed_at)
        failure_times.append(at)
        if at > window_start:
            image.failures.append(Failure(at, 0, "-", "x:" + reference))

    for phone in set(state) | set(busy):
        held = state.get(phone, [0, 0, 0])
        streak, last, run_seq = _forget(held[0], held[1], held[2], now_ms, limits)
        if streak or busy[phone]:
            image.phones[phone] = PhoneImage(streak, busy[phone], last, run_seq)

    image.restricted_until_ms, image.restriction_reason = _tier_restriction(failure_times, limits)
    for block in blocks:
        until = ms_of(block.until)
        if block.kind == GuardBlockKind.ACCOUNT and until > image.restricted_until_ms:
            image.restricted_until_ms, image.restriction_reason = until, block.reason
        elif block.kind == GuardBlockKind.PHONE and block.phone:
            image.blocks[block.phone] = max(image.blocks.get(block.phone, 0), until)
    return LedgerView(image, finished, in_flight_created)


def _forget(streak: int, last: int, run_seq: int, at: int, limits: GuardLimits) -> tuple[int, int, int]:
    """lib.lua's phone_state: a streak at the limit starts afresh after the cooldown, one below it after memory."""
    if streak > 0:
        rest = limits.phone_cooldown_s if streak >= limits.phone_streak_limit else _memory_s(limits)
        if at >= last + round(rest * 1000):
            return 0, 0, 0
    return streak, last, run_seq


def _tier_restriction(failure_times: list[int], limits: GuardLimits) -> tuple[int, str]:
    """The latest end of a restriction caused by a failure that took the window above a tier's threshold."""
    window_ms = round(limits.account_window_s * 1000)
    times = sorted(failure_times)
    until, reason, oldest = 0, "", 0
    for index, at in enumerate(times):
        while times[oldest] <= at - window_ms:
            oldest += 1
        count = index - oldest + 1
        for threshold, seconds in limits.restriction_tiers:
            if count == threshold + 1 and at + round(seconds * 1000) > until:
                until, reason = at + round(seconds * 1000), f"more than {threshold} failures in the window"
    return until, reason
