"""Send attempts in the ledger: the claim that opens one, and the single transaction that ends one.

An attempt is opened in the same transaction that claims its payment (PENDING -> SENDING), before the guard is
asked, so no reservation can exist that the ledger does not know about. It is ended by `end_attempt`: one
transaction that sets the attempt's outcome only if it has none yet and moves the payment only if this attempt
is still the payment's current one (`payment.guard_token`). A duplicate callback, a second settlement pass or the
callback of an earlier attempt therefore changes only its own attempt, once. The guard is told afterwards, and
`guard_resolved_at` records that it was; until then the resolve is owed, and beat pays it (worker.reconcile).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select, update
from sqlmodel import col
from sqlmodel import select as select_rows

from worker.ledger import (
    TERMINAL_STATES,
    AttemptOutcome,
    GuardBlock,
    GuardBlockKind,
    Payment,
    PaymentState,
    SendAttempt,
    announce_event,
    record_event,
    session_scope,
    utcnow,
)
from worker.logs import log_state_change
from worker.reprompts import reprompt_values

__all__ = [
    "AttemptEnd",
    "attempts_of",
    "claim_for_send",
    "end_attempt",
    "get_attempt",
    "mark_attempt",
    "mark_guard_told",
    "payment_id_of",
    "record_guard_block",
    "record_sent",
    "revert_attempt",
]


def payment_id_of(attempt_id: str) -> str:
    """Attempt ids are `<payment id>.<suffix>` (the guard token's long-standing form)."""
    return attempt_id.split(".", 1)[0]


def claim_for_send(engine: Engine, payment_id: str, token: str) -> bool:
    """PENDING -> SENDING and a new attempt named `token`, in one transaction; False if not claimable."""
    now = utcnow()
    with engine.begin() as connection:
        moved = connection.execute(
            update(Payment)
            .where(col(Payment.id) == payment_id, col(Payment.state) == PaymentState.PENDING)
            .values(state=PaymentState.SENDING, guard_token=token, next_attempt_at=None, updated_at=now)
        ).rowcount
        if moved != 1:
            return False
        open_attempt(connection, payment_id, token, now)
    log_state_change(payment_id, PaymentState.SENDING.value, None)
    return True


def open_attempt(connection: Connection, payment_id: str, token: str, now: datetime) -> None:
    """The attempt row of a claim, inside the claim's own transaction (the caller has just moved the payment to
    SENDING with guard_token = token): both or neither."""
    account, lane = connection.execute(
        select(col(Payment.account), col(Payment.queue)).where(col(Payment.id) == payment_id)
    ).one()
    number = connection.execute(
        select(func.count()).select_from(SendAttempt).where(col(SendAttempt.payment_id) == payment_id)
    ).scalar_one()
    connection.execute(
        insert(SendAttempt).values(
            id=token,
            payment_id=payment_id,
            account=account,
            number=int(number) + 1,
            lane=lane,
            created_at=now,
        )
    )


@dataclass(frozen=True, slots=True)
class AttemptEnd:
    attempt_ended: bool  # this call set the attempt's outcome (so this caller owes the guard its resolve)
    payment_moved: bool  # the attempt was current and the payment left one of the allowed states


def end_attempt(
    engine: Engine,
    attempt_id: str,
    outcome: AttemptOutcome,
    *,
    payment_from: Iterable[PaymentState] = (),
    payment_to: PaymentState | None = None,
    guard_told: bool = False,
    attempt_fields: dict[str, Any] | None = None,
    **payment_fields: Any,
) -> AttemptEnd:
    """End one attempt and, while it is still current, move its payment: both or neither, one transaction.

    `guard_told` records at once that nothing is owed (a refusal reserved nothing)."""
    now = utcnow()
    attempt_values: dict[str, Any] = {"outcome": outcome, "outcome_at": now, **(attempt_fields or {})}
    if guard_told:
        attempt_values["guard_resolved_at"] = now
    allowed = [state.value for state in payment_from]
    payment_id = payment_id_of(attempt_id)
    with engine.connect() as connection, connection.begin() as transaction:
        ended = connection.execute(
            update(SendAttempt)
            .where(col(SendAttempt.id) == attempt_id, col(SendAttempt.outcome).is_(None))
            .values(**attempt_values)
        ).rowcount
        if ended != 1:
            transaction.rollback()
            return AttemptEnd(False, False)
        moved = 0
        if payment_to is not None:
            values: dict[str, Any] = {"state": payment_to, "updated_at": now, **payment_fields}
            # A batch with re-prompts asks a cancelled or unanswered prompt again instead (worker/reprompts.py).
            again = reprompt_values(connection, payment_id, payment_to, outcome, now, payment_fields)
            if again is not None:
                values.update(again)
                payment_to = PaymentState.DEFERRED
            if payment_to in TERMINAL_STATES and "settled_at" not in payment_fields:
                values["settled_at"] = now
            moved = connection.execute(
                update(Payment)
                .where(
                    col(Payment.id) == payment_id,
                    col(Payment.guard_token) == attempt_id,
                    col(Payment.state).in_(allowed),
                )
                .values(**values)
            ).rowcount
            if moved != 1 and _is_current(connection, attempt_id):
                # The attempt is current but its payment is not in a state this ending may leave (a status
                # poll saying "not found" while the 201 is being recorded, say): both or neither.
                transaction.rollback()
                return AttemptEnd(False, False)
        committed = (
            record_event(connection, payment_id, payment_to, allowed) if moved == 1 and payment_to else None
        )
        transaction.commit()
    if moved == 1 and payment_to is not None:
        log_state_change(payment_id, payment_to.value, payment_fields.get("reason"))
    announce_event(committed)
    return AttemptEnd(True, moved == 1)


def record_sent(
    engine: Engine,
    attempt_id: str,
    payment_to: PaymentState,
    *,
    provider_reference: str | None = None,
    checkout_request_id: str | None = None,
    **payment_fields: Any,
) -> bool:
    """UpesiPay answered the push (201 or ambiguously): note when and its references on the attempt, and move the
    payment out of SENDING while this attempt is current, in one transaction. False if the payment had moved on
    (a callback outran this bookkeeping): it still gets the references."""
    now = utcnow()
    references: dict[str, Any] = {"sent_at": now}
    if provider_reference is not None:
        references["provider_reference"] = provider_reference
    if checkout_request_id is not None:
        references["checkout_request_id"] = checkout_request_id
    payment_id = payment_id_of(attempt_id)
    current = (col(Payment.id) == payment_id) & (col(Payment.guard_token) == attempt_id)
    with engine.begin() as connection:
        connection.execute(update(SendAttempt).where(col(SendAttempt.id) == attempt_id).values(**references))
        moved = connection.execute(
            update(Payment)
            .where(current, col(Payment.state) == PaymentState.SENDING)
            .values(state=payment_to, updated_at=now, **references, **payment_fields)
        ).rowcount
        if moved != 1:
            connection.execute(update(Payment).where(current).values(updated_at=now, **references))
    if moved == 1:
        log_state_change(payment_id, payment_to.value, payment_fields.get("reason"))
    return moved == 1


def _is_current(connection: Connection, attempt_id: str) -> bool:
    current = connection.execute(
        select(col(Payment.guard_token)).where(col(Payment.id) == payment_id_of(attempt_id))
    ).scalar_one_or_none()
    return bool(current == attempt_id)


def revert_attempt(engine: Engine, attempt_id: str, **payment_fields: Any) -> bool:
    """A late success for an attempt we gave up on (counted as an assumed failure): the attempt becomes REVERTED
    and owes the guard again (the failure's take-back), the payment FAILED -> SUCCEEDED. One transaction."""
    now = utcnow()
    with engine.connect() as connection, connection.begin() as transaction:
        reverted = connection.execute(
            update(SendAttempt)
            .where(col(SendAttempt.id) == attempt_id, col(SendAttempt.outcome) == AttemptOutcome.FAILURE)
            .values(outcome=AttemptOutcome.REVERTED, guard_resolved_at=None)
        ).rowcount
        moved = connection.execute(
            update(Payment)
            .where(
                col(Payment.id) == payment_id_of(attempt_id),
                col(Payment.guard_token) == attempt_id,
                col(Payment.state) == PaymentState.FAILED,
            )
            .values(state=PaymentState.SUCCEEDED, updated_at=now, settled_at=now, **payment_fields)
        ).rowcount
        if reverted != 1 or moved != 1:
            transaction.rollback()
            return False
        committed = record_event(
            connection, payment_id_of(attempt_id), PaymentState.SUCCEEDED, [PaymentState.FAILED.value]
        )
        transaction.commit()
    log_state_change(payment_id_of(attempt_id), PaymentState.SUCCEEDED.value, None)
    announce_event(committed)
    return True


def mark_attempt(engine: Engine, attempt_id: str, **fields: Any) -> None:
    """Record what an attempt learned (sent_at, references) without ending it."""
    with engine.begin() as connection:
        connection.execute(update(SendAttempt).where(col(SendAttempt.id) == attempt_id).values(**fields))


def mark_guard_told(engine: Engine, attempt_id: str, when: datetime | None = None) -> None:
    with engine.begin() as connection:
        connection.execute(
            update(SendAttempt)
            .where(col(SendAttempt.id) == attempt_id, col(SendAttempt.guard_resolved_at).is_(None))
            .values(guard_resolved_at=when or utcnow())
        )


def get_attempt(engine: Engine, attempt_id: str) -> SendAttempt | None:
    with session_scope(engine) as session:
        return session.get(SendAttempt, attempt_id)


def attempts_of(engine: Engine, payment_id: str) -> list[SendAttempt]:
    with session_scope(engine) as session:
        return list(
            session.exec(
                select_rows(SendAttempt)
                .where(col(SendAttempt.payment_id) == payment_id)
                .order_by(col(SendAttempt.number))
            ).all()
        )


def record_guard_block(
    engine: Engine, account: str, kind: GuardBlockKind, until: datetime, reason: str, phone: str | None = None
) -> None:
    """Written before the guard hears of it: a guard rebuilt from the ledger must still see the block."""
    with session_scope(engine) as session:
        session.add(GuardBlock(account=account, kind=kind, phone=phone, until=until, reason=reason[:120]))
        session.commit()
