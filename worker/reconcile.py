"""The guard kept true to the ledger: resolves the ledger owes (an outbox), the rebuild after Redis forgot, and
the periodic comparison (`stkpush guard verify`) with its safe repairs.

- Every attempt outcome is written to the ledger first; `tell_guard` then resolves the reservation and records
  that the guard was told. Whatever stops in between (a worker killed, Redis paused past the client timeout)
  leaves the resolve owed, and beat's dispatch tick pays it (`pay_owed`). Resolving twice is harmless: the guard
  ignores a token it does not hold.
- A rebuilt guard is derived from the ledger alone (worker.guard_ledger), so it counts every finished failure
  at its outcome time and reserves only attempts without an outcome. A resolve still owed for a counted failure
  then finds no reservation and changes nothing: nothing is counted twice.
- Verify repairs only what tightens nothing away: a reservation whose attempt has ended is resolved with the
  ledger's outcome. It never lowers a count or lifts a restriction.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import update
from sqlmodel import col, select

from worker import runtime
from worker.attempts import get_attempt, mark_guard_told
from worker.faults import fail_point
from worker.guard import Decision, GuardLimits, GuardUnavailable, Lane, Outcome, RefusalReason, recovery
from worker.guard_ledger import LedgerView, implied_image, ms_of
from worker.ledger import (
    AttemptOutcome,
    GuardBlock,
    Payment,
    PaymentState,
    PhoneRelease,
    SendAttempt,
    session_scope,
    utcnow,
)
from worker.phones import mask_phone

__all__ = [
    "Drift",
    "accounts_to_verify",
    "admit",
    "ensure_guard_state",
    "keep_guard",
    "last_drift",
    "pay_owed",
    "rebuild_guard",
    "tell_guard",
    "verify_guard",
]

log = logging.getLogger("stkpush.reconcile")

# Outcomes newer than this may still be on their way to the guard (the process that wrote them is telling it
# now): verify neither reports nor repairs them. Longer than a resolve takes, shorter than a dispatch interval
# plus the verify period, so real drift is reported on the next pass.
SETTLING_MS = 3000
# One rebuild at a time per account; the lock outlives a slow ledger read, and the marker check in rebuild.lua
# keeps a second one harmless anyway.
REBUILD_LOCK_MS = 30_000
OWED_LIMIT = 500
# How long (tenths of a second) a refused admit waits for another process's rebuild before deferring.
REBUILD_WAIT_POLLS = 20

_GUARD_CALL = {
    AttemptOutcome.SUCCESS: Outcome.SUCCESS,
    AttemptOutcome.FAILURE: Outcome.FAILURE,
    AttemptOutcome.RELEASED: Outcome.RELEASED,
    # A late success took back an assumed failure: release the reservation if it was never resolved, and take
    # the failure back if it was counted. Both are no-ops when already done.
    AttemptOutcome.REVERTED: Outcome.RELEASED,
    # A refusal reserved nothing, unless a rebuild read the attempt while it was still open: then release it.
    AttemptOutcome.REFUSED: Outcome.RELEASED,
}


def admit(phone: str, token: str, lane: Lane = Lane.INTERACTIVE, account: str | None = None) -> Decision:
    """guard.admit (of `account`, None: the environment's), rebuilding the state first when it is gone (then
    asking once more)."""
    guard = runtime.guard_of(account)
    decision = guard.admit(phone, token, lane)
    if decision.reason == RefusalReason.GUARD_REBUILDING:
        try:
            if ensure_guard_state(account):
                decision = guard.admit(phone, token, lane)
        except GuardUnavailable:
            pass
    return decision


def tell_guard(attempt_id: str, outcome: AttemptOutcome, account: str | None = None) -> bool:
    """Resolve the attempt's reservation as the ledger says it ended, then note that the guard knows. The guard
    is the attempt's account's (read from the ledger unless the caller knows it).

    False (the resolve stays owed, beat retries it) when Redis could not be reached."""
    if outcome == AttemptOutcome.REFUSED:
        mark_guard_told(runtime.engine(), attempt_id)
        return True
    fail_point("before-resolve")
    if account is None:
        attempt = get_attempt(runtime.engine(), attempt_id)
        account = attempt.account if attempt is not None else None
    guard = runtime.guard_of(account)
    try:
        guard.resolve(attempt_id, _GUARD_CALL[outcome])
        if outcome == AttemptOutcome.REVERTED:
            guard.revert_failure(attempt_id)
    except GuardUnavailable:
        log.warning("attempt %s: guard unavailable, its resolve is owed (beat retries it)", attempt_id)
        return False
    mark_guard_told(runtime.engine(), attempt_id)
    return True


def pay_owed(limit: int = OWED_LIMIT, account: str | None = None) -> int:
    """Resolve every ended attempt of `account` the guard was not told about, oldest first; returns how many
    were paid."""
    account = runtime.account(account).name
    with session_scope(runtime.engine()) as session:
        rows = session.exec(
            select(SendAttempt.id, SendAttempt.outcome)
            .where(
                col(SendAttempt.account) == account,
                col(SendAttempt.outcome).is_not(None),
                col(SendAttempt.guard_resolved_at).is_(None),
            )
            .order_by(col(SendAttempt.outcome_at))
            .limit(limit)
        ).all()
    paid = 0
    for attempt_id, outcome in rows:
        if outcome is not None and tell_guard(attempt_id, AttemptOutcome(outcome), account):
            paid += 1
    if paid:
        log.warning("paid %d owed guard resolves from the ledger", paid)
    return paid


def _ledger_view(now_ms: int, account: str | None = None) -> LedgerView:
    guard = runtime.guard_of(account)
    return implied_image(runtime.engine(), guard.account, guard.limits, now_ms)


def rebuild_guard(force: bool = False, account: str | None = None) -> bool:
    """Rebuild the guard's state from the ledger. Without `force`, only when the marker is missing.

    True when this call rebuilt it. A forced rebuild first drops the marker, so admits refuse while the ledger is
    read and every reservation made before is in what it reads (the claim precedes the admit)."""
    guard = runtime.guard_of(account)
    if force:
        recovery.forget(guard)
    elif recovery.has_state(guard):
        return False
    now_ms = recovery.now_ms(guard)
    view = _ledger_view(now_ms, guard.account)
    epoch = f"{now_ms}-{secrets.token_hex(3)}"
    rebuilt = recovery.rebuild(guard, view.image, epoch)
    if rebuilt:
        log.warning(
            "guard for account %s rebuilt from the ledger (epoch %s): %d failures in the window, %d in flight",
            guard.account,
            epoch,
            len(view.image.failures),
            len(view.image.reservations),
        )
        # Resolves that raced the ledger read (their attempt ended after it) left reservations behind.
        verify_guard(repair=True, account=guard.account)
    return rebuilt


def ensure_guard_state(account: str | None = None) -> bool:
    """Beat's check (and a refused admit's): rebuild at once when the marker is gone. True once the state is
    back (rebuilt here, or by another process while this one waited)."""
    guard = runtime.guard_of(account)
    if recovery.has_state(guard):
        return False
    log.error(
        "guard for account %s has no state (Redis lost it): refusing sends until rebuilt", guard.account
    )
    lock = f"stkpush:{{{guard.account}}}:rebuild-lock"
    client = runtime.guard_redis()
    if not client.set(lock, "1", nx=True, px=REBUILD_LOCK_MS):
        # Another process is rebuilding: wait a moment for it rather than refuse at once.
        for _ in range(REBUILD_WAIT_POLLS):
            time.sleep(0.1)
            if recovery.has_state(guard):
                return True
        return False
    try:
        return rebuild_guard(account=guard.account)
    finally:
        client.delete(lock)


def keep_guard(account: str | None = None) -> None:
    """Beat's dispatch tick: rebuild a forgotten state, then pay the resolves the ledger owes; for `account`, or
    (None) for every enabled account in turn, one account's trouble never stopping the next's."""
    if account is not None:
        try:
            ensure_guard_state(account)
            pay_owed(account=account)
        except GuardUnavailable:
            log.warning("guard of account %s unavailable: owed resolves wait for the next tick", account)
        return
    names = runtime.accounts()
    for name in names:
        try:
            ensure_guard_state(name)  # one EXISTS unless the state is gone
        except GuardUnavailable:
            log.warning("guard of account %s unavailable: owed resolves wait for the next tick", name)
    # The owed resolves of every account in one read; each is paid to its own account's guard.
    for name in _accounts_owed(names):
        try:
            pay_owed(account=name)
        except GuardUnavailable:
            log.warning("guard of account %s unavailable: owed resolves wait for the next tick", name)


def _accounts_owed(names: list[str]) -> list[str]:
    with session_scope(runtime.engine()) as session:
        owed = set(
            session.exec(
                select(SendAttempt.account)
                .where(col(SendAttempt.outcome).is_not(None), col(SendAttempt.guard_resolved_at).is_(None))
                .distinct()
            ).all()
        )
    return [name for name in names if name in owed]


def accounts_to_verify() -> list[str]:
    """The enabled accounts whose guard holds anything the ledger implies: an attempt in flight or ended within
    the window, or a provider block not yet over. Others have nothing to compare (an account's whole state ages
    out with its window), so a verify pass costs per active account, not per account configured."""
    names = runtime.accounts()
    # The window is the settings' for every account (UpesiPay's rule is the same for all).
    horizon = utcnow() - timedelta(seconds=runtime.settings().account_window_s)
    with session_scope(runtime.engine()) as session:
        active = set(
            session.exec(
                select(SendAttempt.account)
                .where(col(SendAttempt.outcome).is_(None) | (col(SendAttempt.outcome_at) > horizon))
                .distinct()
            ).all()
        ) | set(session.exec(select(GuardBlock.account).where(col(GuardBlock.until) > utcnow())).all())
    return [name for name in names if name in active or name == names[0]]


@dataclass
class Drift:
    """What the guard holds that the ledger does not imply (or the other way round). Phones are masked."""

    items: list[str] = field(default_factory=list)
    repaired: int = 0

    @property
    def count(self) -> int:
        return len(self.items)


def verify_guard(repair: bool = False, account: str | None = None) -> Drift:
    """Compare the live state of `account`'s guard (None: the environment's) with the ledger's image; with
    `repair`, resolve leaked reservations."""
    guard = runtime.guard_of(account)
    live = recovery.dump(guard)
    view = _ledger_view(live.now_ms, guard.account)
    image, drift = view.image, Drift()
    settled_before = live.now_ms - SETTLING_MS
    if live.marker is None:
        drift.items.append("no rebuild marker: the state is gone, admits refuse until rebuilt")
        _publish(drift, guard.account)
        return drift

    # Reservations. One whose attempt ended a while ago leaked (a resolve lost after the ledger moved).
    expected = {reservation.token for reservation in image.reservations}
    settling_phones: set[str] = set()  # numbers whose reservation's ending may still be on its way
    for token in sorted(set(live.reservations) - expected):
        ended = view.finished.get(token) or _ended(token)
        if ended is None:
            drift.items.append(f"reservation {token}: no such attempt in flight in the ledger")
            continue
        outcome, at_ms, _told = ended
        if at_ms > settled_before:
            settling_phones.add(live.reservations[token])
            continue
        drift.items.append(f"reservation {token}: its attempt ended ({outcome.value}) but it is still held")
        if repair:
            guard.resolve(token, _GUARD_CALL[outcome])
            mark_guard_told(runtime.engine(), token)
            drift.repaired += 1
    for token in sorted(expected - set(live.reservations)):
        if view.in_flight_created_ms.get(token, 0) <= settled_before:
            drift.items.append(f"attempt {token} is in flight in the ledger but holds no reservation")
    if live.in_flight != len(live.reservations):
        drift.items.append(f"in flight {live.in_flight} != {len(live.reservations)} reservations held")

    # The window: compared away from its edges, where a few milliseconds between ledger and guard matter.
    window_start = live.now_ms - round(guard.limits.account_window_s * 1000) + SETTLING_MS
    recent = {token for token, (_, at, _) in view.finished.items() if at > settled_before}

    # A failure told late (an owed resolve paid by beat) carries the payment's time in the guard and its outcome
    # time in the ledger: it is left out of both counts until both times have settled.
    recent |= {f.token for f in live.failures if f.at_ms > settled_before}

    def settled(failures: list[recovery.Failure]) -> int:
        return sum(1 for f in failures if window_start < f.at_ms and f.token not in recent)

    live_failures, ledger_failures = settled(live.failures), settled(image.failures)
    if live_failures != ledger_failures:
        drift.items.append(f"failures in the window: guard {live_failures}, ledger {ledger_failures}")

    # Streaks and busy numbers, for numbers with nothing on its way to the guard.
    unsettled_phones = {f.phone for f in image.failures if f.token in recent}
    unsettled_phones |= {r.phone for r in image.reservations if r.token in recent} | settling_phones
    limits = guard.limits
    for phone in sorted((set(live.phones) | set(image.phones)) - unsettled_phones):
        held = live.phones.get(phone, recovery.PhoneImage(0, 0, 0, 0))
        want = image.phones.get(phone, recovery.PhoneImage(0, 0, 0, 0))
        streak = _effective_streak(held, live.now_ms, limits)
        if streak != want.streak or held.in_flight != want.in_flight:
            drift.items.append(
                f"number {mask_phone(phone)}: guard streak {streak} busy {held.in_flight}, "
                f"ledger streak {want.streak} busy {want.in_flight}"
            )

    live_restricted = live.restricted_until_ms if live.restricted_until_ms > live.now_ms else 0
    want_restricted = image.restricted_until_ms if image.restricted_until_ms > live.now_ms else 0
    if abs(live_restricted - want_restricted) > SETTLING_MS:
        drift.items.append(f"restricted until: guard {live_restricted} ms, ledger {want_restricted} ms")
    for phone in sorted(set(image.blocks) | set(live.blocks)):
        live_until = live.blocks.get(phone, 0) if live.blocks.get(phone, 0) > live.now_ms else 0
        want_until = image.blocks.get(phone, 0) if image.blocks.get(phone, 0) > live.now_ms else 0
        if abs(live_until - want_until) > SETTLING_MS:
            drift.items.append(f"number {mask_phone(phone)}: provider block differs from the ledger's")
    _publish(drift, guard.account)
    return drift


def _ended(attempt_id: str) -> tuple[AttemptOutcome, int, bool] | None:
    """An attempt's ending straight from the ledger (the image lists only endings that shape the state)."""
    attempt = get_attempt(runtime.engine(), attempt_id)
    if attempt is None or attempt.outcome is None or attempt.outcome_at is None:
        return None
    return AttemptOutcome(attempt.outcome), ms_of(attempt.outcome_at), attempt.guard_resolved_at is not None


def _effective_streak(held: recovery.PhoneImage, now_ms: int, limits: GuardLimits) -> int:
    """The streak the guard's scripts would see now (lib.lua, phone_state)."""
    if held.streak == 0:
        return 0
    rest = limits.phone_cooldown_s if held.streak >= limits.phone_streak_limit else limits.phone_memory_s
    return 0 if now_ms >= held.last_failure_ms + round(rest * 1000) else held.streak


DRIFT_TTL_S = 3600


def _publish(drift: Drift, account: str) -> None:
    """The last comparison's result, for /metrics and /healthz (any process may serve them)."""
    try:
        runtime.redis_client().set(
            f"stkpush:{{{account}}}:verify", f"{drift.count}:{utcnow().isoformat()}", ex=DRIFT_TTL_S
        )
    except Exception as error:  # a lost report must never fail the comparison
        log.debug("verify result not published (%s)", type(error).__name__)


def last_drift(account: str | None = None) -> int | None:
    """The drift count of the latest comparison (any process's), or None if none ran within DRIFT_TTL_S."""
    account = runtime.account(account).name
    stored = runtime.redis_client().get(f"stkpush:{{{account}}}:verify")
    if stored is None:
        return None
    text = stored.decode() if isinstance(stored, bytes) else str(stored)
    return int(text.split(":", 1)[0])


def release_phone(phone: str, released_by: str, account: str | None = None) -> int:
    """An operator frees a number held at its streak limit: the release is recorded in the ledger first (so a
    rebuilt guard keeps it), then the guard starts the number's streak afresh, then the payments waiting for it
    are due now. Returns how many waiting payments were released. Raises GuardUnavailable when Redis is away
    (the ledger row stays: the next rebuild applies it)."""
    name, engine = runtime.account(account).name, runtime.engine()
    with session_scope(engine) as session:
        session.add(PhoneRelease(account=name, phone=phone, released_by=released_by[:64]))
        session.commit()
    runtime.guard_of(name).release_phone(phone)
    with engine.begin() as connection:
        released = connection.execute(
            update(Payment)
            .where(
                col(Payment.account) == name,
                col(Payment.phone) == phone,
                col(Payment.state) == PaymentState.DEFERRED,
                col(Payment.reason).startswith("guard: phone_blocked"),
            )
            .values(next_attempt_at=utcnow())
        ).rowcount
    log.warning("number %s released from its streak limit by %s", mask_phone(phone), released_by[:64])
    return int(released or 0)
