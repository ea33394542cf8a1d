"""Opt-in re-prompts for a batch (`stkpush batch FILE --reprompt N --reprompt-after 4h`, POST /batches).

A batch row whose prompt was cancelled (ResultCode 1032) or not answered (1037) gets up to `Batch.reprompt_max`
further prompts. The decision is taken inside the transaction that ends the attempt (worker.attempts.end_attempt,
one conditional UPDATE): instead of CANCELLED or FAILED the payment goes back to DEFERRED with
next_attempt_at = the prompt's end + `Batch.reprompt_after_s`, and the dispatcher releases it like any waiting
batch row. So each re-prompt is a new send attempt (the payment's history lists it), asked of the guard in the
bulk lane: only with headroom, never while a prompt is live on the number (the guard's busy rule), never past a
block. Paid, rejected, expired or otherwise failed payments (insufficient funds, a wrong PIN, a failure we only
assumed) are never prompted again, and a batch without the option never prompts anyone twice.

Crash safety: the count of prompts is the payment's attempts that ended in a failure (the ledger), read in the
same transaction, so a replayed callback (its attempt already ended) or a crash between steps re-prompts nobody
twice.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select
from sqlmodel import col

from worker.ledger import AttemptOutcome, Batch, Payment, PaymentState, SendAttempt

__all__ = [
    "MAX_REPROMPTS",
    "REPROMPT_RESULT_CODES",
    "RepromptError",
    "check",
    "parse_after",
    "reprompt_values",
]

# At most this many further prompts per invoice: with its history a number nears UpesiPay's streak of 10 fast.
MAX_REPROMPTS = 5
MIN_AFTER_S = 1
MAX_AFTER_S = 7 * 24 * 3600
# Cancelled by the customer, not answered (DS timeout): the prompts worth asking again. Nothing else.
REPROMPT_RESULT_CODES = frozenset({1032, 1037})
REPROMPT_REASON = "re-prompt"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d{1,9})\s*([smhd]?)\s*$")


class RepromptError(ValueError):
    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def parse_after(text: str | int) -> int:
    """'4h', '30m', '90s', '2d' or a number of seconds."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _DURATION.match(str(text))
    if match is None:
        raise RepromptError("reprompt_after", "must be a whole number of seconds or like 90s, 30m, 4h, 2d")
    return int(match.group(1)) * _UNITS[match.group(2) or "s"]


def check(reprompt: int, after_s: int | None) -> tuple[int, int | None]:
    """The batch's (reprompt_max, reprompt_after_s), or RepromptError naming the field and its rule."""
    if isinstance(reprompt, bool) or not isinstance(reprompt, int) or not 0 <= reprompt <= MAX_REPROMPTS:
        raise RepromptError("reprompt", f"must be a whole number from 0 to {MAX_REPROMPTS}")
    if reprompt == 0:
        if after_s is not None:
            raise RepromptError("reprompt_after", "is only allowed with reprompt of 1 or more")
        return 0, None
    if after_s is None:
        raise RepromptError(
            "reprompt_after", "is required with reprompt (how long after a prompt to ask again)"
        )
    if not MIN_AFTER_S <= after_s <= MAX_AFTER_S:
        raise RepromptError("reprompt_after", f"must be from {MIN_AFTER_S} s to {MAX_AFTER_S // 86400} days")
    return reprompt, after_s


def reprompt_values(
    connection: Connection,
    payment_id: str,
    payment_to: PaymentState,
    outcome: AttemptOutcome,
    now: datetime,
    payment_fields: dict[str, Any],
) -> dict[str, Any] | None:
    """Inside end_attempt's transaction, after the attempt's outcome was set: the payment's new values when this
    ending is re-prompted instead (DEFERRED until the re-prompt is due), else None."""
    if outcome != AttemptOutcome.FAILURE or payment_to not in (PaymentState.CANCELLED, PaymentState.FAILED):
        return None
    if payment_fields.get("result_code") not in REPROMPT_RESULT_CODES:
        return None
    row = connection.execute(
        select(col(Batch.reprompt_max), col(Batch.reprompt_after_s), col(Payment.expires_at))
        .join(Payment, col(Payment.batch_id) == col(Batch.id))
        .where(col(Payment.id) == payment_id, col(Payment.queue) == "bulk")
    ).first()
    if row is None or not row[0] or row[1] is None:
        return None
    allowed, after_s, expires_at = int(row[0]), int(row[1]), row[2]
    prompts = connection.execute(
        select(func.count())
        .select_from(SendAttempt)
        .where(col(SendAttempt.payment_id) == payment_id, col(SendAttempt.outcome) == AttemptOutcome.FAILURE)
    ).scalar_one()
    if int(prompts) > allowed:
        return None  # this was its last allowed prompt: it ends as the prompt did
    due = now + timedelta(seconds=after_s)
    if expires_at is not None:
        deadline = expires_at if expires_at.tzinfo is not None else expires_at.replace(tzinfo=due.tzinfo)
        if due >= deadline:
            return None  # the re-prompt would come after its deadline: it ends now
    ended = "cancelled" if payment_fields.get("result_code") == 1032 else "not answered"
    return {
        "state": PaymentState.DEFERRED,
        "next_attempt_at": due,
        "guard_token": None,
        "reason": f"{REPROMPT_REASON} {int(prompts)} of {allowed}: prompt {ended}",
        "result_code": payment_fields.get("result_code"),
        "result_desc": payment_fields.get("result_desc"),
    }
