"""How long to honour a block or restriction UpesiPay announced (docs/guard.md, "Provider blocks").

A stated end wins: the Retry-After header, else `until <time>` (or `for N hours`) in the message, read by the
client (worker.upesipay.answers) into `PushResult.retry_after_s`. Without one, the rule's own duration: a number's
block lasts 24 h; an account's restriction the tier the failures in our own window imply (more than 1000: 72 h,
500: 24 h, else 4 h; never less than 4 h). Nothing is probed before that end, unless the merchant chose
PROVIDER_BLOCK_WAIT_S (a shorter wait, then one probe): the looser reading, at their risk.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine, func
from sqlmodel import col, select

from worker.guard import GuardLimits
from worker.guard.guard import DAY_S, DEFAULT_RESTRICTION_TIERS
from worker.ledger import AttemptOutcome, ExternalFailure, SendAttempt, session_scope, utcnow
from worker.upesipay import PushResult, RestrictionScope

# UpesiPay's number block (docs/upesipay.md): 24 hours.
PHONE_BLOCK_S = float(DAY_S)
# A plain 429 that names neither a number nor the account is throttling, not an abuse answer: asked again after this.
THROTTLE_WAIT_S = 60.0


def account_failures_in_window(engine: Engine, account: str, window_s: float) -> int:
    """Failures the ledger holds in the last `window_s`: our attempts (a failure later taken back counted when it
    happened, as the provider counted it) and other channels' failures."""
    since = utcnow() - timedelta(seconds=window_s)
    with session_scope(engine) as session:
        ours = session.exec(
            select(func.count())
            .select_from(SendAttempt)
            .where(
                col(SendAttempt.account) == account,
                col(SendAttempt.outcome).in_([AttemptOutcome.FAILURE, AttemptOutcome.REVERTED]),
                col(SendAttempt.outcome_at) > since,
            )
        ).one()
        theirs = session.exec(
            select(func.count())
            .select_from(ExternalFailure)
            .where(col(ExternalFailure.account) == account, col(ExternalFailure.failed_at) > since)
        ).one()
    return int(ours) + int(theirs)


def restriction_s(failures: int, tiers: tuple[tuple[int, float], ...] = DEFAULT_RESTRICTION_TIERS) -> float:
    """The restriction the window's failures imply: the highest tier whose threshold they reach, at least the
    lowest tier's duration (the provider may count failures we can't see)."""
    if not tiers:
        return 0.0
    wait = tiers[0][1]
    for threshold, seconds in tiers:
        if failures >= threshold:
            wait = max(wait, seconds)
    return wait


def block_wait_s(result: PushResult, failures: int, limits: GuardLimits, looser_wait_s: float = 0) -> float:
    """How long the answer `result` (RATE_LIMITED) keeps the number or the account closed.

    `failures`: the failures in our window (account_failures_in_window, or the guard's count if higher).
    `looser_wait_s` > 0 (PROVIDER_BLOCK_WAIT_S) replaces the rule's duration when the answer states no end."""
    if result.retry_after_s is not None:
        return result.retry_after_s
    if result.scope not in (RestrictionScope.PHONE, RestrictionScope.ACCOUNT):
        return THROTTLE_WAIT_S
    if looser_wait_s > 0:
        return looser_wait_s
    if result.scope == RestrictionScope.PHONE:
        return PHONE_BLOCK_S
    return restriction_s(failures, limits.restriction_tiers)
