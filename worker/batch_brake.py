"""A batch stops itself before it burns the account's budget (docs/batches.md, "When a batch pauses itself").

Two triggers, both read from the ledger (the truth), over the batch's outcomes since it last resumed:
- the last BATCH_PAUSE_REJECTIONS (K) outcomes are rejections with the same error (a wrong channel id makes every
  push a 400 that UpesiPay may count);
- over its last BATCH_PAUSE_OUTCOMES (M) outcomes, the failure rate is at least BATCH_PAUSE_FAILURE_RATE and at
  least BATCH_PAUSE_NORM_MARGIN above the rest of the account's rate in the guard's window.

A paused batch's waiting rows are held (DEFERRED with no next_attempt_at, reason "held: ..."), never failed, until
`resume` (the CLI's batch-resume, POST /batches/{id}/resume). To keep the first trigger's promise (at most K
pushes in a same-error rejection run) under concurrency, a batch row is claimed only while the batch's rows in
SENDING plus its current same-error rejection run stay below K, decided under a lock on the batch's row. The
count is the ledger's, so a worker that dies mid-send leaks nothing (the dispatcher recovers its row to UNKNOWN).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import Connection, func, select, update
from sqlmodel import col

from worker import runtime
from worker.attempts import open_attempt
from worker.ledger import WAITING_STATES, Batch, Payment, PaymentState, utcnow
from worker.logs import log_state_change

log = logging.getLogger("stkpush.batch_brake")

HELD_PREFIX = "held: batch paused"
# Outcomes a batch row can end in after a push: the customer was (or may have been) prompted, or UpesiPay refused.
FAILED_OUTCOMES = (PaymentState.FAILED, PaymentState.CANCELLED, PaymentState.REJECTED)
OUTCOMES = (PaymentState.SUCCEEDED, *FAILED_OUTCOMES)
# How long a batch row waits when its batch already has K sends unanswered or rejected in a row.
THROTTLE_WAIT_S = 1.0


class Claim(StrEnum):
    CLAIMED = "claimed"
    NOT_CLAIMABLE = "not-claimable"  # not PENDING (another delivery owns it)
    HELD = "held"  # its batch is paused: the row was held
    THROTTLED = "throttled"  # K of its batch's sends are unanswered or rejected in a row: deferred briefly


def _batch(connection: Connection, batch_id: str) -> tuple[str, datetime | None, str | None, datetime] | None:
    """The batch's account, paused_at, pause_reason and the time its outcomes count from (last resume or start)."""
    row = connection.execute(
        select(
            col(Batch.account),
            col(Batch.paused_at),
            col(Batch.pause_reason),
            func.coalesce(col(Batch.resumed_at), col(Batch.created_at)),
        ).where(col(Batch.id) == batch_id)
    ).first()
    return None if row is None else (row[0], row[1], row[2], row[3])


def _same_error_run(connection: Connection, batch_id: str, since: datetime) -> list[str | None]:
    """The batch's latest outcomes while they are rejections with the newest one's error, newest first (at most
    K): the run the first trigger counts."""
    limit = runtime.settings().batch_pause_rejections
    rows = connection.execute(
        select(col(Payment.state), col(Payment.reason))
        .where(
            col(Payment.batch_id) == batch_id,
            col(Payment.state).in_(OUTCOMES),
            col(Payment.settled_at) > since,
        )
        .order_by(col(Payment.settled_at).desc())
        .limit(limit)
    ).all()
    run: list[str | None] = []
    for state, reason in rows:
        if PaymentState(state) != PaymentState.REJECTED or (run and reason != run[0]):
            break
        run.append(reason)
    return run


def claim(payment: Payment, token: str) -> Claim:
    """PENDING -> SENDING for a batch row, unless its batch is paused (held) or has K sends unanswered or
    rejected in a row (deferred THROTTLE_WAIT_S). One transaction holding the batch row's lock."""
    assert payment.batch_id is not None
    limit = runtime.settings().batch_pause_rejections
    now = utcnow()
    with runtime.engine().begin() as connection:
        # An UPDATE that changes nothing still takes the row's lock (PostgreSQL) or the write lock (SQLite), so
        # two workers claiming rows of one batch count each other's claims.
        connection.execute(
            update(Batch).where(col(Batch.id) == payment.batch_id).values(paused_at=col(Batch.paused_at))
        )
        batch = _batch(connection, payment.batch_id)
        reason, next_attempt = None, None
        if batch is None:
            pass  # a row whose batch record is gone (deleted by an operator): nothing to brake
        elif batch[1] is not None:
            reason = f"{HELD_PREFIX}: {batch[2]}"[:500]
        else:
            since = batch[3]
            sending = connection.execute(
                select(func.count()).where(
                    col(Payment.batch_id) == payment.batch_id, col(Payment.state) == PaymentState.SENDING
                )
            ).scalar_one()
            run = len(_same_error_run(connection, payment.batch_id, since))
            if run >= limit:
                # The trigger fired but the pause was not recorded (a worker died in between): hold this row,
                # and note_outcome below pauses the batch.
                reason = f"{HELD_PREFIX}: {run} rejections in a row with the same error"
            elif sending + run >= limit:
                reason = "batch: earlier sends unanswered or rejected, waiting for their answers"
                next_attempt = now + timedelta(seconds=THROTTLE_WAIT_S)
        to_state = PaymentState.SENDING if reason is None else PaymentState.DEFERRED
        values = {"state": to_state, "updated_at": now, "next_attempt_at": next_attempt}
        values |= {"guard_token": token} if reason is None else {"reason": reason, "guard_token": None}
        moved = connection.execute(
            update(Payment)
            .where(col(Payment.id) == payment.id, col(Payment.state) == PaymentState.PENDING)
            .values(**values)
        ).rowcount
        if moved == 1 and reason is None:
            open_attempt(connection, payment.id, token, now)
    if moved != 1:
        return Claim.NOT_CLAIMABLE
    log_state_change(payment.id, to_state.value, reason)
    if reason is None:
        return Claim.CLAIMED
    if next_attempt is None:
        note_outcome(payment.batch_id)
        return Claim.HELD
    return Claim.THROTTLED


def pause_reason(batch_id: str) -> str | None:
    """Why the batch should pause now, from its outcomes since it last resumed; None when it should go on."""
    settings = runtime.settings()
    engine = runtime.engine()
    with engine.connect() as connection:
        batch = _batch(connection, batch_id)
        if batch is None or batch[1] is not None:
            return None
        account, since = batch[0], batch[3]
        run = _same_error_run(connection, batch_id, since)
        if len(run) >= settings.batch_pause_rejections:
            return f"{len(run)} rejections in a row with the same error: {run[0] or 'no detail'}"[:500]
        window = settings.batch_pause_outcomes
        if window == 0:
            return None
        recent = connection.execute(
            select(col(Payment.state))
            .where(
                col(Payment.batch_id) == batch_id,
                col(Payment.state).in_(OUTCOMES),
                col(Payment.settled_at) > since,
            )
            .order_by(col(Payment.settled_at).desc())
            .limit(window)
        ).all()
        if len(recent) < window:
            return None
        rate = sum(PaymentState(state) in FAILED_OUTCOMES for (state,) in recent) / window
        norm = _account_norm(connection, batch_id, account)
        threshold = max(settings.batch_pause_failure_rate, norm + settings.batch_pause_norm_margin)
    if rate >= threshold:
        return (
            f"{rate:.0%} of its last {window} outcomes failed (account norm {norm:.0%}, "
            f"pauses at {threshold:.0%})"
        )
    return None


def _account_norm(connection: Connection, batch_id: str, account: str) -> float:
    """The failure rate of the account's other outcomes in the guard's window (0 when there are none)."""
    since = utcnow() - timedelta(seconds=runtime.settings().account_window_s)
    counted = connection.execute(
        select(col(Payment.state), func.count())
        .where(
            col(Payment.account) == account,
            col(Payment.state).in_(OUTCOMES),
            col(Payment.settled_at) > since,
            (col(Payment.batch_id) != batch_id) | col(Payment.batch_id).is_(None),
        )
        .group_by(Payment.state)
    ).all()
    total = sum(int(count) for _, count in counted)
    failed = sum(int(count) for state, count in counted if PaymentState(state) in FAILED_OUTCOMES)
    return failed / total if total else 0.0


def note_outcome(batch_id: str | None) -> bool:
    """A batch row just ended: pause its batch if a trigger fired. True when this call paused it."""
    if batch_id is None:
        return False
    reason = pause_reason(batch_id)
    return reason is not None and pause(batch_id, reason)


def pause(batch_id: str, reason: str) -> bool:
    """Pause the batch and hold its waiting rows; False when it was already paused (or is unknown)."""
    now = utcnow()
    held_reason = f"{HELD_PREFIX}: {reason}"[:500]
    with runtime.engine().begin() as connection:
        paused = connection.execute(
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.paused_at).is_(None))
            .values(paused_at=now, pause_reason=reason[:500])
        ).rowcount
        if paused != 1:
            return False
        held = connection.execute(
            update(Payment)
            .where(col(Payment.batch_id) == batch_id, col(Payment.state).in_(WAITING_STATES))
            .values(state=PaymentState.DEFERRED, next_attempt_at=None, reason=held_reason, updated_at=now)
        ).rowcount
    log.warning("batch %s paused, %d waiting payments held: %s", batch_id, held, reason)
    return True


def resume(batch_id: str) -> int | None:
    """Resume a paused batch: its held rows become due at once (released within the bulk lane's headroom), and
    outcomes before now no longer count against it. Returns how many rows were released, None when the batch
    was not paused."""
    now = utcnow()
    with runtime.engine().begin() as connection:
        resumed = connection.execute(
            update(Batch)
            .where(col(Batch.id) == batch_id, col(Batch.paused_at).is_not(None))
            .values(paused_at=None, pause_reason=None, resumed_at=now)
        ).rowcount
        if resumed != 1:
            return None
        released = connection.execute(
            update(Payment)
            .where(
                col(Payment.batch_id) == batch_id,
                col(Payment.state) == PaymentState.DEFERRED,
                col(Payment.reason).startswith(HELD_PREFIX),
            )
            .values(next_attempt_at=now, reason="batch resumed", updated_at=now)
        ).rowcount
    log.warning("batch %s resumed: %d held payments released", batch_id, released)
    return int(released)
