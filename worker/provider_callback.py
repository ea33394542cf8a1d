"""UpesiPay's payment callback: its fields typed and bounded, checked against the ledger, then applied or held.

A callback can only be checked whole once the ledger knows UpesiPay's CheckoutRequestID for the payment, which
it learns from the 201. A callback that arrives before that (the row still SENDING, or UNKNOWN after a timeout)
is checked on every other field and *held* on the row; the worker applies it when it records the 201, and only
if its CheckoutRequestID is the one UpesiPay gave. A held callback that never matches is dropped, and the
payment is settled by transaction-status like any other whose callback never came.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from worker import in_progress, metrics, runtime
from worker.ledger import Payment, PaymentState, get_payment, utcnow
from worker.phones import PhoneNumberError, normalise_phone
from worker.settlement import ASSUMED_FAILURE, RESULT_SUCCESS, finish, state_for_result

log = logging.getLogger("stkpush.callbacks")

# M-Pesa result codes are small; the ledger's column is 32-bit on PostgreSQL.
RESULT_CODE_RANGE = (-(2**31), 2**31 - 1)
CHECKOUT_MAX = 100
RECEIPT_MAX = 64
DESC_MAX = 255
# Callbacks held for one row before its 201 is recorded: UpesiPay sends one, perhaps twice; more is noise.
HELD_MAX = 4
# Below the column's 4096 characters even with HELD_MAX entries at their longest.
HELD_COLUMN_MAX = 4096
# States whose provider identity (CheckoutRequestID) is not known yet: a callback there is held, not applied.
IDENTITY_UNKNOWN = (PaymentState.SENDING, PaymentState.UNKNOWN)


class CallbackProblem(ValueError):
    """The callback is malformed or contradicts the ledger: names the field and the rule, never a value."""

    def __init__(self, field: str, rule: str) -> None:
        self.field, self.rule = field, rule
        super().__init__(f"{field} {rule}")


@dataclass(frozen=True)
class ProviderCallback:
    """The fields of `response` the ledger keeps or checks, each of its documented type."""

    result_code: int
    result_desc: str
    checkout_request_id: str | None
    receipt: str | None
    amount: float | None
    phone: str | None  # canonical, or None when absent
    external_reference: str | None


def _text(response: dict[str, Any], name: str, limit: int) -> str | None:
    value = response.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CallbackProblem(name, "must be a string")
    if len(value) > limit:
        raise CallbackProblem(name, f"must be at most {limit} characters")
    if any(not ch.isprintable() for ch in value):
        raise CallbackProblem(name, "must not contain control characters")
    return value


def parse_callback(body: bytes) -> ProviderCallback:
    """The callback's fields, or CallbackProblem naming the first one that is malformed."""
    try:
        document = json.loads(body)
    except RecursionError:
        raise CallbackProblem("body", "must not nest objects or lists this deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise CallbackProblem("body", "must be JSON") from None
    response = document.get("response") if isinstance(document, dict) else None
    if not isinstance(response, dict):
        raise CallbackProblem("response", "must be an object")
    code = response.get("ResultCode")
    if isinstance(code, bool) or not isinstance(code, int):
        raise CallbackProblem("ResultCode", "must be an integer")
    if not RESULT_CODE_RANGE[0] <= code <= RESULT_CODE_RANGE[1]:
        raise CallbackProblem(
            "ResultCode", f"must be between {RESULT_CODE_RANGE[0]} and {RESULT_CODE_RANGE[1]}"
        )
    amount = response.get("Amount")
    if amount is not None and (
        isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount)
    ):
        raise CallbackProblem("Amount", "must be a number")
    phone_text = response.get("Phone")
    phone: str | None = None
    if phone_text is not None:
        if not isinstance(phone_text, str):
            raise CallbackProblem("Phone", "must be a string")
        try:
            phone = normalise_phone(phone_text)
        except PhoneNumberError:
            raise CallbackProblem("Phone", "must be a Kenyan mobile number") from None
    receipt = _text(response, "MpesaReceiptNumber", RECEIPT_MAX)
    if receipt is not None and not receipt.isalnum():
        raise CallbackProblem("MpesaReceiptNumber", "may contain only letters and digits")
    _text(response, "MerchantRequestID", CHECKOUT_MAX)
    return ProviderCallback(
        result_code=code,
        result_desc=_text(response, "ResultDesc", 10_000) or "",
        checkout_request_id=_text(response, "CheckoutRequestID", CHECKOUT_MAX),
        receipt=receipt,
        amount=amount,
        phone=phone,
        external_reference=_text(response, "ExternalReference", 200),
    )


def check_against(payment: Payment, callback: ProviderCallback) -> None:
    """Raise CallbackProblem for the first field that contradicts the ledger. The CheckoutRequestID is checked
    only when the ledger knows it; the caller holds callbacks for rows that don't."""
    if callback.external_reference not in (None, payment.external_reference):
        raise CallbackProblem("ExternalReference", "does not match the payment")
    if payment.checkout_request_id and callback.checkout_request_id != payment.checkout_request_id:
        raise CallbackProblem("CheckoutRequestID", "does not match the payment")
    if callback.amount is None or callback.amount != payment.amount:
        raise CallbackProblem("Amount", "does not match the payment")
    if callback.phone is None or callback.phone != payment.phone:
        raise CallbackProblem("Phone", "does not match the payment")
    if callback.checkout_request_id is None:
        raise CallbackProblem("CheckoutRequestID", "is required")
    if callback.result_code == RESULT_SUCCESS and callback.receipt is None:
        raise CallbackProblem("MpesaReceiptNumber", "is required when ResultCode is 0")


def apply_callback(payment: Payment, callback: ProviderCallback, attempt_id: str | None = None) -> bool:
    """Settle the attempt (default: the payment's current one) from a callback already checked against it; True
    if this call settled it."""
    state = state_for_result(callback.result_code)
    if callback.result_code == in_progress.RESULT_IN_PROGRESS:
        retried = in_progress.retry_in_progress(
            payment,
            attempt_id,
            result_code=callback.result_code,
            result_desc=callback.result_desc[:DESC_MAX],
        )
        if retried is not None:
            return retried
    return finish(
        payment,
        state,
        attempt_id,
        result_code=callback.result_code,
        result_desc=callback.result_desc[:DESC_MAX],
        receipt=callback.receipt if callback.result_code == RESULT_SUCCESS else None,
        reason=None if state == PaymentState.SUCCEEDED else f"M-Pesa result {callback.result_code}",
    )


def identity_unknown(payment: Payment) -> bool:
    """True when nothing the ledger holds can confirm a callback's CheckoutRequestID: the 201 is not recorded
    yet, or never was (a send that timed out and was finally given up on, FAILED `unsettled:`). A callback for
    such a row is held, never applied: a late success there can't be told from a forged one."""
    if payment.checkout_request_id:
        return False
    if payment.state in IDENTITY_UNKNOWN:
        return True
    return payment.state == PaymentState.FAILED and (payment.reason or "").startswith(ASSUMED_FAILURE)


def _held_entry(callback: ProviderCallback) -> dict[str, Any]:
    entry = asdict(callback)
    # Amount, phone and reference were checked before holding; only what applying needs is kept.
    for name in ("amount", "phone", "external_reference"):
        entry.pop(name)
    entry["result_desc"] = entry["result_desc"][:DESC_MAX]
    return entry


def hold_callback(payment: Payment, callback: ProviderCallback) -> bool:
    """Keep the callback on a row whose CheckoutRequestID is not known yet; False when the row has moved on
    (the caller reads it again and judges the callback against what it now knows)."""
    engine = runtime.engine()
    for _ in range(5):  # compare-and-set against another callback held at the same moment
        current = get_payment(engine, payment.id)
        if current is None or not identity_unknown(current):
            return False
        held = json.loads(current.held_callbacks) if current.held_callbacks else []
        if len(held) >= HELD_MAX:
            log.warning("payment %s: callback not held, %d already waiting", payment.id, HELD_MAX)
            return True
        text = json.dumps([*held, _held_entry(callback)])
        assert len(text) <= HELD_COLUMN_MAX
        statement = (
            update(Payment)
            .where(
                col(Payment.id) == payment.id,
                col(Payment.state) == current.state,
                col(Payment.checkout_request_id).is_(None),
                col(Payment.held_callbacks).is_(None)
                if current.held_callbacks is None
                else col(Payment.held_callbacks) == current.held_callbacks,
            )
            .values(held_callbacks=text, updated_at=utcnow())
        )
        with engine.begin() as connection:
            if connection.execute(statement).rowcount == 1:
                return True
    return False


def apply_held(payment_id: str) -> bool:
    """Once the 201 is recorded: apply the first held callback whose CheckoutRequestID is UpesiPay's, drop the
    rest. True if one settled the payment."""
    engine = runtime.engine()
    payment = get_payment(engine, payment_id)
    if payment is None or not payment.held_callbacks or not payment.checkout_request_id:
        return False
    statement = (
        update(Payment)
        .where(col(Payment.id) == payment_id, col(Payment.held_callbacks) == payment.held_callbacks)
        .values(held_callbacks=None)
    )
    with engine.begin() as connection:
        if connection.execute(statement).rowcount != 1:
            return False  # another process took them
    for entry in json.loads(payment.held_callbacks):
        held = ProviderCallback(amount=None, phone=None, external_reference=None, **entry)
        if held.checkout_request_id != payment.checkout_request_id:
            log.warning("payment %s: held callback dropped: CheckoutRequestID does not match", payment_id)
            continue
        changed = apply_callback(payment, held)
        metrics.record_callback(held.result_code, changed)
        return changed
    return False
