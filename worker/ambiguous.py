"""When an ambiguous send (timeout, reset after sending, 5xx: UNKNOWN) may be sent again: only on strong evidence.

Evidence is the lookups settlement makes about the attempt (transaction-status by provider reference when one is
known, else the transactions list filtered by external reference), recorded in the ledger (`unknown_lookup`):
- only lookups made once the prompt's lifetime has passed count (PROMPT_LIFETIME_S after the attempt was sent): a
  prompt still live could be answered yet, and a list that lags has had time to show the push;
- lookups count only UNKNOWN_LOOKUP_SPACING_S apart, each in its own slot (a unique key): two workers asking at
  once, or a crash between asking and recording, never count one answer twice or lose one recorded;
- resending needs UNKNOWN_LOOKUPS (2) lookups saying "no such request" and none saying it exists (QUEUED);
- "not in the list" is no proof at UpesiPay (docs/upesipay.md: failed or unanswered prompts probably never appear
  there), so evidence from the list alone licenses nothing unless the merchant sets
  UNKNOWN_RESEND_ON_LIST_ABSENCE (the looser reading; the sandbox's list does show every push).
Anything less keeps the payment UNKNOWN: settled by a later answer or callback, or given up by SETTLE_GIVE_UP_S.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlmodel import col, select

from worker import runtime
from worker.attempts import get_attempt
from worker.ledger import Payment, UnknownLookup, insert_ignoring_conflicts, session_scope, utcnow
from worker.upesipay import StatusResult, TransactionStatus

log = logging.getLogger("stkpush.ambiguous")

__all__ = ["Evidence", "lookups_of", "weigh"]

# The answers that weigh: "no such request", and "it exists (no outcome yet)". SUCCESS and FAILED settle at once.
_WEIGHED = {TransactionStatus.NOT_FOUND: "not-found", TransactionStatus.QUEUED: "queued"}


@dataclass(frozen=True)
class Evidence:
    source: str  # "status" or "list"
    absent: int  # spaced lookups after the prompt's lifetime that found no such request
    present: int  # spaced lookups that found it (QUEUED)
    needed: int
    licensed: bool  # the payment may be sent again
    why: str  # for the payment's reason and logs


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def lookups_of(attempt_id: str) -> list[UnknownLookup]:
    with session_scope(runtime.engine()) as session:
        return list(
            session.exec(
                select(UnknownLookup)
                .where(col(UnknownLookup.attempt_id) == attempt_id)
                .order_by(col(UnknownLookup.slot))
            ).all()
        )


def _record(attempt_id: str, source: str, answer: str, spacing_s: float) -> None:
    """Record one answer in the next slot, unless the last recorded one is closer than `spacing_s`."""
    now = utcnow()
    engine = runtime.engine()
    with engine.begin() as connection:
        count, last = connection.execute(
            select(func.count(), func.max(UnknownLookup.asked_at)).where(
                col(UnknownLookup.attempt_id) == attempt_id
            )
        ).one()
        if last is not None and now - _aware(last) < timedelta(seconds=spacing_s):
            return
        table = UnknownLookup.__table__  # type: ignore[attr-defined]
        connection.execute(
            insert_ignoring_conflicts(connection, table, ["attempt_id", "slot"]).values(
                attempt_id=attempt_id, slot=int(count), source=source, answer=answer, asked_at=now
            )
        )


def weigh(payment: Payment, status: StatusResult) -> Evidence:
    """Record what `status` says about the payment's current (UNKNOWN) attempt and weigh all that is recorded."""
    settings = runtime.settings()
    source = "status" if payment.provider_reference else "list"
    needed = settings.unknown_lookups
    attempt = get_attempt(runtime.engine(), payment.guard_token) if payment.guard_token else None
    if attempt is None:
        return Evidence(source, 0, 0, needed, False, "no send attempt to weigh")
    sent = _aware(attempt.sent_at or attempt.created_at)
    lifetime_over = utcnow() - sent >= timedelta(seconds=settings.prompt_lifetime_s)
    answer = _WEIGHED.get(status.status)
    if answer is not None and lifetime_over:
        _record(attempt.id, source, answer, settings.unknown_lookup_spacing_s)
    rows = lookups_of(attempt.id)
    absent = sum(1 for row in rows if row.answer == "not-found")
    present = sum(1 for row in rows if row.answer == "queued")
    trusted = source == "status" or settings.unknown_resend_on_list_absence
    licensed = trusted and present == 0 and absent >= needed
    if licensed:
        why = f"{absent} lookups {settings.unknown_lookup_spacing_s}s apart found no such request"
    elif not lifetime_over:
        why = f"the prompt may still be live ({settings.prompt_lifetime_s}s)"
    elif present:
        why = "UpesiPay holds the request: waiting for its outcome"
    elif not trusted:
        why = "only the transactions list can be asked, and absence from it is no proof"
    else:
        why = f"{absent} of {needed} spaced lookups found no such request"
    return Evidence(source, absent, present, needed, licensed, why)
